import pytest
import torch

from chatexaonepath.vision_tower.aggregator import AggregatorConfig, GatedAttentionAggregator
from chatexaonepath.vision_tower.projector import AttentionPoolProjector, ProjectorConfig


def test_shapes_for_k_tokens_and_padded_batches():
    torch.manual_seed(0)
    agg = GatedAttentionAggregator(AggregatorConfig(in_dim=32, hidden_dim=16, attention_dim=8, dropout=0.0)).eval()
    projector = AttentionPoolProjector(ProjectorConfig(in_dim=16, out_dim=24, num_tokens=4, num_heads=4))
    out = agg([torch.randn(7, 32), torch.randn(12, 32)])
    tokens = projector(out.patch_embeddings, out.attention_logits, out.mask)
    assert tokens.shape == (2, 4, 24) and torch.isfinite(tokens).all()


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
    torch.testing.assert_close(tokens[0], alone[0], atol=1e-5, rtol=1e-5)


def test_zero_queries_reproduce_clam_pooling():
    """At initialisation each token is CLAM's attention pooling of the projected values."""
    torch.manual_seed(0)
    projector = AttentionPoolProjector(ProjectorConfig(in_dim=16, out_dim=8, num_tokens=1, num_heads=4))
    embeddings, logits = torch.randn(1, 20, 16), torch.randn(1, 20)
    tokens = projector(embeddings, logits)
    pooled = logits.softmax(-1) @ projector.value(embeddings)[0]
    expected = projector.proj(projector.norm(projector.out(pooled)))
    torch.testing.assert_close(tokens[0], expected, atol=1e-5, rtol=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_tokens"):
        ProjectorConfig(num_tokens=0)
    with pytest.raises(ValueError, match="divisible"):
        ProjectorConfig(in_dim=10, num_heads=4)
