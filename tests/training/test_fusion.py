from training.fusion import reciprocal_rank_fusion


def test_rrf_scores_and_order():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]], k=60)
    assert [item for item, _ in fused] == ["a", "c", "b"]
    assert fused[0][1] == 1 / 61 + 1 / 62
    assert fused[1][1] == 1 / 63 + 1 / 61
    assert fused[2][1] == 1 / 62


def test_rrf_ties_keep_first_seen_order():
    assert [i for i, _ in reciprocal_rank_fusion([["x"], ["y"]])] == ["x", "y"]
