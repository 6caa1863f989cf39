"""treeplay's distributed runtime: config, Ray workers, the loop, the CLI and the inspector.
Imports run downward from here to engines/, learners/, agents/, search/ and store/."""
