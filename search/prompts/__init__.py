"""Prompt files of the search package: plain-text templates that search.expansion loads with
``treeplay.agents.prompt_files.load_prompt(name, "treeplay.search")``."""
