"""Repair after removal: the refit consumers match the dense layers better, and change nothing unpruned."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from prune.apply import apply_keep
from prune.repair import Gram, RepairConfig, consumers, refit_linear, repair_model
from prune.select import Keep
from slim.data import frame_weights
from slim.model import install_explicit_attention
from slim.sources import tiny_random_whisper


FRAMES = 300  # a 3 s window (max_source_positions 150) keeps the many forwards of the refit cheap


def _tiny(seed=0):
    return install_explicit_attention(tiny_random_whisper(seed=seed, max_source_positions=FRAMES // 2)).eval()


def _batches(n=3, B=2, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(B, 80, FRAMES, generator=g),
             "labels": torch.cat([torch.randint(0, 50000, (B, T - 2), generator=g),
                                  torch.full((B, 2), -100)], 1)} for _ in range(n)]


KEEP = Keep(heads={"encoder": [[0, 2], [1, 3]], "decoder": [[3], [0, 1, 2]], "cross": [[1, 2], [0, 2, 3]]},
            ffn={"encoder": [list(range(0, 128, 2)), list(range(90))], "decoder": [list(range(40)), list(range(100))]})


def _outputs(model, batch):
    """Every consumer's output in one teacher-forced forward, as (N, C) rows (decoder: label positions)."""
    got, hooks = {}, []
    for name, lin in consumers(model):
        hooks.append(lin.register_forward_hook(lambda m, a, out, name=name: got.__setitem__(name, out.detach())))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    mask = batch["labels"] != -100
    return {n: (t if n.startswith("encoder") else t[mask]).reshape(-1, t.shape[-1]) for n, t in got.items()}


def _consumer_errors(model, dense, batches):
    """Relative squared error of each consumer's output against the dense layer's, on `batches`."""
    num, den = {}, {}
    for b in batches:
        ours, theirs = _outputs(model, b), _outputs(dense, b)
        for n in ours:
            num[n] = num.get(n, 0.0) + float(((ours[n] - theirs[n]) ** 2).sum())
            den[n] = den.get(n, 0.0) + float((theirs[n] ** 2).sum())
    return {n: num[n] / den[n] for n in num}


def test_repair_lowers_every_consumers_error_and_the_logit_error():
    dense = _tiny()
    pruned = apply_keep(copy.deepcopy(dense), KEEP)
    cal, held = _batches(3, seed=1), _batches(2, seed=2)
    before = _consumer_errors(pruned, dense, cal)
    report = repair_model(pruned, dense, cal, ridge=1e-3, progress=False)
    after = _consumer_errors(pruned, dense, cal)
    assert [r["layer"] for r in report] == list(before)
    for r in report:  # the solve's own accounting agrees with a direct measurement
        assert r["rel_err_after"] == pytest.approx(after[r["layer"]], rel=1e-2, abs=1e-6)
        assert after[r["layer"]] < before[r["layer"]]
    # the shapes are those of the pruned model: the repair refits, it does not regrow
    assert [lin.in_features for _, lin in consumers(pruned)] == [r["inputs"] for r in report]

    # on held-out batches the whole model's logits move towards the dense model's
    def logit_err(m):
        with torch.no_grad():
            return sum(float(((m(**b).logits - dense(**b).logits) ** 2).mean()) for b in held)

    unrepaired = apply_keep(copy.deepcopy(dense), KEEP)
    assert logit_err(pruned) < 0.8 * logit_err(unrepaired)


def test_stream_target_brings_the_encoder_output_closer_to_dense():
    dense = _tiny()
    cal = _batches(3, seed=1)

    def encoder_err(target):
        m = apply_keep(copy.deepcopy(dense), KEEP)
        if target:
            repair_model(m, dense, cal, ridge=1e-3, target=target, progress=False)
        with torch.no_grad():
            return sum(float(((m.model.encoder(b["input_features"]).last_hidden_state
                               - dense.model.encoder(b["input_features"]).last_hidden_state) ** 2).mean()) for b in cal)

    none, layer, stream = encoder_err(None), encoder_err("layer"), encoder_err("stream")
    assert stream < layer < none
    with pytest.raises(ValueError, match="target"):
        repair_model(copy.deepcopy(dense), dense, cal, target="nope", progress=False)


def test_repair_of_an_unpruned_model_changes_nothing():
    dense = _tiny()
    model = copy.deepcopy(dense)
    report = repair_model(model, dense, _batches(2), ridge=1e-2, progress=False)
    assert all(r["rel_err_before"] < 1e-6 for r in report)  # float32 Gram products: round-off only
    for (n, a), (_, b) in zip(model.state_dict().items(), dense.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


def test_refit_linear_solves_least_squares_exactly():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w_true, b_true = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = x @ w_true.T + b_true
    x1 = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    before, after = refit_linear(lin, x1.T @ x1, x1.T @ y, (y * y).sum(), ridge=0.0)
    assert before > 0.01 and after < 1e-10
    torch.testing.assert_close(lin.weight.double(), w_true, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin.bias.double(), b_true, atol=1e-5, rtol=0)


def test_pad_weight_fits_the_encoder_rows_inside_the_audio_closer():
    """With the frames past each clip's audio weighted down, the encoder's consumers match dense better on
    the frames inside it (and worse past it) than the unweighted fit; the Gram weighting is the weighted
    least squares it stands for; and an unpruned model still comes back unchanged."""
    dense = _tiny()
    cal = _batches(3, seed=1)
    for b in cal:  # clips of 0.4-1.2 s in the 3 s window: most encoder frames are padding, as in Whisper's
        b["audio_frames"] = torch.tensor([40, 120])
    held = _batches(2, seed=2)
    for b in held:
        b["audio_frames"] = torch.tensor([40, 120])

    def split_err(pad_weight):
        m = apply_keep(copy.deepcopy(dense), KEEP)
        repair_model(m, dense, cal, ridge=1e-3, pad_weight=pad_weight, progress=False)
        num_in = num_out = 0.0
        for b in held:
            w = frame_weights(b["audio_frames"], FRAMES // 2, 0.0).bool()
            with torch.no_grad():
                e = ((m.model.encoder(b["input_features"]).last_hidden_state
                      - dense.model.encoder(b["input_features"]).last_hidden_state) ** 2).sum(-1)
            num_in += float(e[w].sum())
            num_out += float(e[~w].sum())
        return num_in, num_out

    (in1, out1), (in_w, out_w) = split_err(1.0), split_err(0.05)
    assert in_w < 0.9 * in1 and out_w > out1

    unpruned = copy.deepcopy(dense)
    report = repair_model(unpruned, dense, cal, ridge=1e-2, pad_weight=0.05, progress=False)
    assert all(r["rel_err_before"] < 1e-6 for r in report)

    g = torch.Generator().manual_seed(0)
    x, y, w = torch.randn(50, 4, generator=g), torch.randn(50, 2, generator=g), torch.rand(50, generator=g)
    gram = Gram(4, 2)
    gram.add(x[:20], y[:20], w[:20])
    gram.add(x[20:], y[20:], w[20:])
    x1 = torch.cat([x, torch.ones(50, 1)], 1).double()
    torch.testing.assert_close(gram.xtx, x1.T @ (w.double()[:, None] * x1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram.xty, x1.T @ (w.double()[:, None] * y.double()), rtol=1e-5, atol=1e-5)
    assert float(gram.yty) == pytest.approx(float((w.double()[:, None] * y.double() ** 2).sum()), rel=1e-6)


def test_frame_weights_mark_the_encoder_frames_that_hold_audio():
    w = frame_weights(torch.tensor([5, 8, 0]), 6, 0.25)  # 5 mel frames span 3 encoder frames, 8 span 4
    assert w.tolist() == [[1, 1, 1, .25, .25, .25], [1, 1, 1, 1, .25, .25], [.25] * 6]
    assert frame_weights(torch.tensor([5]), 6, 1.0) is None  # every frame alike: no weights at all
    assert frame_weights(None, 6, 0.25) is None  # lengths unknown


@pytest.mark.parametrize("kwargs, match", [({"calibration_batches": 0}, "calibration_batches"),
                                           ({"ridge": -1.0}, "ridge"), ({"target": "x"}, "target"),
                                           ({"pad_weight": -0.1}, "pad_weight"), ({"pad_weight": 1.5}, "pad_weight")])
def test_repair_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepairConfig(**kwargs)
