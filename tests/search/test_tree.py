"""PreferenceTree: structure queries, validation, store records and JSON/GraphML/DOT round trips."""

from __future__ import annotations

import io
import json

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from treeplay.search.tree import PreferenceTree
from treeplay.store.records import NodeRecord, TreeRecord


def small_tree() -> PreferenceTree:
    t = PreferenceTree("12+5-3\n", task_id="t1", environment="arithmetic", policy_version=2)
    a = t.add_child(t.root, "12+5=17", visits=3, value=0.5)
    b = t.add_child(t.root, "12+5=18", visits=1, value=-1.0, observation="hmm")
    t.add_child(a, "17-3=14", terminal=True, correct=True, visits=2, value=1.0)
    t.add_child(a, "17-3=15", terminal=True, correct=False, visits=1, value=-1.0)
    t.add_child(b, 'say "x"', error="environment raised RuntimeError: boom", terminal=True, correct=False)
    t[t.root]["selected"] = t[a]["selected"] = t[3]["selected"] = True
    return t


def test_structure_queries_and_transcript_text():
    t = small_tree()
    assert t.children(t.root) == [1, 2]
    assert t.siblings(1) == [2] and t.siblings(1, include_self=True) == [1, 2]
    assert t.path(3) == [0, 1, 3] and t.parent(3) == 1 and t.parent(0) is None
    assert t.text(3) == "12+5-3\n12+5=17\n17-3=14\n"
    # observations follow their action on their own line (agents.base.transcript)
    assert t.text(5) == '12+5-3\n12+5=18\nhmm\nsay "x"\n'
    assert t.continuation(3, 1) == "17-3=14\n"
    assert t.selected_path() == [0, 1, 3] and t.final_node() == 3 and t.solved()
    assert t.leaves() == [3, 4, 5]
    stats = t.subtree_stats()
    assert stats == {
        "nodes": 6,
        "leaves": 3,
        "depth": 2,
        "terminal": 3,
        "correct": 1,
        "errors": 1,
        "visits": 0,
        "max_branching": 2,
    }
    assert t.subtree_stats(1)["nodes"] == 3
    assert t[3]["depth"] == 2


def test_add_child_and_root_errors():
    t = PreferenceTree("p\n")
    with pytest.raises(ValueError, match="already has a root"):
        t.add_root()
    with pytest.raises(ValueError, match="not a node"):
        t.add_child(42, "x")


def test_record_round_trip_keeps_everything():
    t = small_tree()
    t.info["search"] = {"waves": 3}
    rec = t.to_record()
    assert rec.task_id == "t1" and rec.environment == "arithmetic" and rec.policy_version == 2
    assert [n.parent_key for n in rec.nodes] == [None, 0, 0, 1, 1, 2]
    assert rec.nodes[2].info["observation"] == "hmm"
    back = PreferenceTree.from_record(rec)
    assert back.to_record() == rec
    assert back.text(5) == t.text(5) and back.selected_path() == t.selected_path()
    # new nodes get fresh keys after a reload
    assert back.add_child(back.root, "again") == 6


def _rec(nodes):
    return TreeRecord(task_id="t", prompt="p\n", nodes=nodes)


def test_from_record_rejects_broken_trees():
    with pytest.raises(ValueError, match="dangling parent"):
        PreferenceTree.from_record(_rec([NodeRecord(0, None, "", 0), NodeRecord(1, 7, "a", 1)]))
    with pytest.raises(ValueError, match="roots"):
        PreferenceTree.from_record(_rec([NodeRecord(0, None, "", 0), NodeRecord(1, None, "a", 0)]))
    with pytest.raises(ValueError, match="duplicate"):
        PreferenceTree.from_record(_rec([NodeRecord(0, None, "", 0), NodeRecord(0, 0, "a", 1)]))
    cyc = [NodeRecord(0, None, "", 0), NodeRecord(1, 2, "a", 1), NodeRecord(2, 1, "b", 2)]
    with pytest.raises(ValueError, match="cycle"):
        PreferenceTree.from_record(_rec(cyc))
    with pytest.raises(ValueError, match="depth"):
        PreferenceTree.from_record(_rec([NodeRecord(0, None, "", 0), NodeRecord(1, 0, "a", 5)]))


def test_json_graphml_dot_exports():
    t = small_tree()
    data = json.loads(t.to_json())
    assert data["graph"]["prompt"] == "12+5-3\n" and len(data["nodes"]) == 6 and len(data["links"]) == 5
    assert PreferenceTree.from_json(t.to_json()).to_record() == t.to_record()

    g = nx.read_graphml(io.BytesIO(t.to_graphml().encode()))
    assert g.number_of_nodes() == 6 and g.number_of_edges() == 5
    assert g.nodes["5"]["step"] == 'say "x"' and g.nodes["3"]["correct"] is True

    dot = t.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert 'say \\"x\\"' in dot and "n1 -> n3;" in dot
    # every label is one well-formed quoted string: unescaped quotes come in pairs
    for line in dot.splitlines():
        if "label=" in line:
            assert line.replace('\\"', "").count('"') % 2 == 0


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    parents=st.lists(st.integers(min_value=0, max_value=1000), max_size=12),
    steps=st.lists(texts, min_size=12),
)
def test_random_trees_round_trip(parents, steps):
    t = PreferenceTree('prompt with "quotes" & <xml>\n', task_id="h")
    for i, p in enumerate(parents):
        t.add_child(p % len(t), steps[i], visits=i, value=i / 3, terminal=bool(i % 2), info={"k": steps[i]})
    t.validate()
    assert PreferenceTree.from_record(t.to_record()).to_record() == t.to_record()
    assert PreferenceTree.from_json(t.to_json()).to_record() == t.to_record()
    g = nx.read_graphml(io.BytesIO(t.to_graphml().encode()))
    assert g.number_of_nodes() == len(t)
    assert t.to_dot().count(" -> ") == len(t) - 1
