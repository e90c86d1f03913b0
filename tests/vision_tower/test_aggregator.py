import pytest
import torch

from chatexaonepath.vision_tower.aggregator import AggregatorConfig, GatedAttentionAggregator, pad_bags


@pytest.fixture
def aggregator():
    torch.manual_seed(0)
    return GatedAttentionAggregator(AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0)).eval()


def clam_reference(agg: GatedAttentionAggregator, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAM's Attn_Net_Gated pooling written out directly for one slide."""
    h = torch.relu(bag @ agg.embed[0].weight.T + agg.embed[0].bias)
    a = torch.tanh(h @ agg.attention_tanh[0].weight.T + agg.attention_tanh[0].bias)
    b = torch.sigmoid(h @ agg.attention_gate[0].weight.T + agg.attention_gate[0].bias)
    scores = ((a * b) @ agg.attention_score.weight.T + agg.attention_score.bias).squeeze(-1)
    weights = scores.softmax(0)
    return weights @ h, weights


def test_matches_clam_gated_attention(aggregator):
    bag = torch.randn(50, 32)
    out = aggregator(bag)
    pooled, weights = clam_reference(aggregator, bag)
    torch.testing.assert_close(out.pooled[0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention[0], weights, atol=1e-6, rtol=1e-5)
    assert out.patch_embeddings.shape == (1, 50, 16)
    assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_bags_of_different_sizes_equal_their_single_results(aggregator):
    bags = [torch.randn(10, 32), torch.randn(37, 32), torch.randn(1, 32)]
    batched = aggregator(bags)
    assert batched.mask.sum(1).tolist() == [10, 37, 1]
    for i, bag in enumerate(bags):
        single = aggregator(bag)
        torch.testing.assert_close(batched.pooled[i], single.pooled[0], atol=1e-5, rtol=1e-5)
        n = len(bag)
        torch.testing.assert_close(batched.attention[i, :n], single.attention[0], atol=1e-6, rtol=1e-5)
        assert (batched.attention[i, n:] == 0).all() and torch.isinf(batched.attention_logits[i, n:]).all()


def test_chunking_does_not_change_results_and_handles_big_bags():
    torch.manual_seed(1)
    config = AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0, chunk_size=1000)
    chunked = GatedAttentionAggregator(config).eval()
    whole = GatedAttentionAggregator(AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0,
                                                      chunk_size=10**6)).eval()
    whole.load_state_dict(chunked.state_dict())
    bag = torch.randn(100_000, 32)
    with torch.no_grad():
        a, b = chunked(bag), whole(bag)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-5, rtol=1e-4)
    # gradients flow through the checkpointed chunks
    small = torch.randn(2500, 32, requires_grad=True)
    chunked(small).pooled.sum().backward()
    assert small.grad is not None and chunked.embed[0].weight.grad is not None


def test_bad_inputs_raise(aggregator):
    with pytest.raises(ValueError, match="expected features"):
        aggregator(torch.randn(4, 10, 31))
    with pytest.raises(ValueError, match="at least one patch"):
        aggregator(torch.randn(2, 5, 32), mask=torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError):
        pad_bags([torch.randn(3, 32), torch.randn(0, 32)])
