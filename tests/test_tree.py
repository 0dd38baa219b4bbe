"""The conversation tree (tree.py): branches, the active path, drawing and flat JSON."""

from __future__ import annotations

from aiohttp_session_store.models import LineageNode
from aiohttp_session_store.tree import build_tree, tree_json


def node(key: str, parent: str | None, at: int) -> LineageNode:
    return LineageNode(key, "", "s", "chat", f"n-{key}", None, 2, parent, at)


def test_siblings_branch_and_the_newest_node_makes_the_active_path() -> None:
    # a -> b -> c, and a -> b2 (a regenerate of b), and x: a second root.
    nodes = [node("a", None, 1), node("b", "a", 2), node("b2", "a", 3), node("c", "b", 4)]
    tree = build_tree(nodes)
    assert tree.roots == ("a",)
    assert tree.children == {"a": ("b", "b2"), "b": ("c",)}
    assert tree.active_path == ("a", "b", "c")
    assert tree.branch_points == 1
    drawn = [(line.lead, line.node.hash, line.active) for line in tree.walk()]
    assert drawn == [
        ("", "a", True),
        ("├─ ", "b", True),
        ("│  ", "c", True),
        ("└─ ", "b2", False),
    ]


def test_a_parent_outside_the_session_makes_a_root_and_ties_go_to_the_later_node() -> None:
    nodes = [node("a", "elsewhere", 5), node("b", None, 5)]
    tree = build_tree(nodes)
    assert tree.roots == ("a", "b")
    assert tree.active_path == ("b",)
    assert tree.branch_points == 1  # two roots: the session forked at its start
    assert [line.lead for line in tree.walk()] == ["├─ ", "└─ "]


def test_a_long_chain_is_walked_without_recursion_and_the_json_is_flat() -> None:
    nodes = [node("0", None, 0)] + [node(str(i), str(i - 1), i) for i in range(1, 5000)]
    tree = build_tree(nodes)
    assert len(tree.active_path) == 5000
    assert {line.lead for line in tree.walk()} == {""}  # no drift to the right
    shown = tree_json(tree)
    assert shown["nodes"][0]["children"] == ["1"]
    assert shown["nodes"][-1] == {
        **shown["nodes"][-1],
        "hash": "4999",
        "children": [],
        "active": True,
        "user_message": None,
    }
    assert build_tree([]).active_path == ()
