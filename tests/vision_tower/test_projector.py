import pytest
import torch

from chatexaonepath.vision_tower.aggregator import AggregatorConfig, GatedAttentionAggregator
from chatexaonepath.vision_tower.projector import AttentionPoolProjector, ProjectorConfig


def test_shapes_for_k_tokens_and_padded_batches():
    torch.manual_seed(0)
    agg = GatedAttentionAggregator(AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0)).eval()
    projector = AttentionPoolProjector(ProjectorConfig(in_dim=16, out_dim=24, num_tokens=4, num_heads=4))
    out = agg([torch.randn(7, 32), torch.randn(12, 32)])
    projected = projector(out.patch_embeddings, out.attention_logits, out.mask)
    assert projected.visual_tokens.shape == (2, 4, 24) and torch.isfinite(projected.visual_tokens).all()
    weights = projected.pooling_weights
    assert weights.shape == (2, 12) and (weights[0, 7:] == 0).all()  # padding gets no weight
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_padding_does_not_change_a_slides_tokens():
    torch.manual_seed(0)
    agg = GatedAttentionAggregator(AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0)).eval()
    projector = AttentionPoolProjector(ProjectorConfig(in_dim=16, out_dim=24, num_tokens=2, num_heads=4))
    torch.nn.init.normal_(projector.queries)
    bags = [torch.randn(7, 32), torch.randn(12, 32)]
    batched = agg(bags)
    tokens = projector(batched.patch_embeddings, batched.attention_logits, batched.mask)
    single = agg(bags[0])
    alone = projector(single.patch_embeddings, single.attention_logits, single.mask)
    torch.testing.assert_close(tokens.visual_tokens[0], alone.visual_tokens[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens.pooling_weights[0, :7], alone.pooling_weights[0], atol=1e-6, rtol=1e-5)


def test_zero_queries_reproduce_clam_pooling():
    """At initialisation each token is CLAM's attention pooling of the projected values."""
    torch.manual_seed(0)
    projector = AttentionPoolProjector(ProjectorConfig(in_dim=16, out_dim=8, num_tokens=1, num_heads=4))
    embeddings, logits = torch.randn(1, 20, 16), torch.randn(1, 20)
    projected = projector(embeddings, logits)
    pooled = logits.softmax(-1) @ projector.value(embeddings)[0]
    expected = projector.proj(projector.norm(projector.out(pooled)))
    torch.testing.assert_close(projected.visual_tokens[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projected.pooling_weights, logits.softmax(-1))


def test_pooling_weights_are_the_ones_the_tokens_were_pooled_with():
    """With learned queries the weights are softmax(q·k/√d + a), not CLAM's softmax(a); the tokens use exactly them."""
    torch.manual_seed(0)
    config = ProjectorConfig(in_dim=16, out_dim=8, num_tokens=3, num_heads=4)
    projector = AttentionPoolProjector(config)
    torch.nn.init.normal_(projector.queries, std=2.0)
    embeddings, logits = torch.randn(1, 20, 16), torch.randn(1, 20)
    projected = projector(embeddings, logits)
    # An independent computation, head by head and query by query.
    keys, values = projector.key(embeddings)[0], projector.value(embeddings)[0]  # (N, H)
    per_head = []
    heads = []
    for h in range(config.num_heads):
        sl = slice(4 * h, 4 * h + 4)
        w = (projector.queries[:, sl] @ keys[:, sl].T / 2.0 + logits[0]).softmax(-1)  # (K, N), √d = 2
        per_head.append(w)
        heads.append(w @ values[:, sl])  # (K, d)
    expected_tokens = projector.proj(projector.norm(projector.out(torch.cat(heads, -1))))
    torch.testing.assert_close(projected.visual_tokens[0], expected_tokens, atol=1e-5, rtol=1e-5)
    expected_weights = torch.stack(per_head).mean(dim=(0, 1))  # mean over heads and queries
    torch.testing.assert_close(projected.pooling_weights[0], expected_weights, atol=1e-6, rtol=1e-5)
    assert (projected.pooling_weights[0] - logits[0].softmax(-1)).abs().max() > 0.05  # not CLAM's map


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_tokens"):
        ProjectorConfig(num_tokens=0)
    with pytest.raises(ValueError, match="divisible"):
        ProjectorConfig(in_dim=10, num_heads=4)
