"""Prompt files of the search package: plain-text templates that search.expansion loads with
``agents.prompt_files.load_prompt(name, "search")``."""
