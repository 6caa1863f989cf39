"""How we explore and what we keep of it: preference trees, batched MCTS, pair and list extraction.

- ``search.tree``: ``PreferenceTree`` (networkx), records round-trip, JSON/GraphML/DOT export.
- ``search.mcts``: ``MCTSConfig``, ``search_many`` (MCTS-DPO batched across trees), ``search``;
  ``search.expansion`` expands one wave of leaves for it.
- ``search.preferences``: ``step_pairs``, ``ranked_lists``, ``tree_result``, ``smallest_margin_first``,
  ``curriculum``.
"""
