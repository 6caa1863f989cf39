"""Files the tests share that are not tests: the PostgreSQL test server, the example plug-in."""
