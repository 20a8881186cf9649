"""Where actors go (common/ray_runtime.node_order): in turn over the nodes with room for them, by capacity."""

from common.ray_runtime import node_order

NODES = [{"NodeID": "b", "Alive": True, "Resources": {"CPU": 2.0}},
         {"NodeID": "a", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
         {"NodeID": "head", "Alive": True, "Resources": {}},
         {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 64.0}}]


def test_actors_go_in_turn_to_the_nodes_with_room_for_them():
    order = node_order(NODES, 12, per_actor=1)
    assert order[:4] == ["a", "b", "a", "b"]  # in turn while both have room
    assert order.count("b") == 2 + 1 and order.count("a") == 8 + 1  # full: the rest in turn over both
    assert node_order(NODES, 3) == ["a", "b", "a"]  # zero-CPU actors (caption workers): in turn, no limit
    assert node_order(NODES, 2, "GPU", 1) == ["a", "a"]  # only the GPU node
    assert node_order([{"NodeID": "x", "Alive": True, "Resources": {}}], 2) == ["x", "x"]  # no node has any
