"""treeplay's distributed runtime: config, engines, learners, Ray workers, the loop, the CLI and the
inspector. Imports run downward from here to agents/, search/ and store/."""

__version__ = "0.1.0"
