"""treeplay's distributed runtime: config, engines, learners, Ray workers, the loop, the CLI and the
inspector. Imports run downward from here to agents/, search/ and store/."""
