"""How we explore and what we keep of it: preference trees, batched MCTS, pair and list extraction."""
