"""The Hugging Face ONNX layout (onnx-community's): what transformers.js (4.x) and onnx-asr load.

    onnx/encoder_model{q}.onnx          input_features (B, n_mels, M <= 3000) -> last_hidden_state (B, M / 2, d_model)
    onnx/decoder_model_merged{q}.onnx   input_ids (B, T), encoder_hidden_states (B, 1500, d_model),
                                        past_key_values.{i}.decoder.{key,value} (B, H_i, P, D),
                                        past_key_values.{i}.encoder.{key,value} (B, C_i, 1500, D),
                                        use_cache_branch (1,) bool
                                        -> logits (B, 1, vocab), present.{i}.decoder.{key,value} (B, H_i, P+T, D),
                                           present.{i}.encoder.{key,value} (B, C_i, 1500, D)
    config.json, generation_config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
    vocab.json, added_tokens.json

{q} is "" for a float export and "_quantized" for an INT8 one (transformers.js `dtype: "q8"`, onnx-asr
`quantization="quantized"`). H_i and C_i are layer i's own self- and cross-attention head counts, written as
numbers in the input shapes: both runtimes create the first (empty) past tensors from those shapes, so a
pruned model's uneven layers need no padding here (unlike the sherpa-onnx layout).

The merged decoder is two graphs under one `If` on `use_cache_branch`:
- false, the prompt step: positions from 0; each layer's cross K/V are computed from `encoder_hidden_states`
  and returned as `present.{i}.encoder.*`; the past inputs are not read (the runtimes pass empty ones).
- true, every later step: positions from P (the past length); the cross K/V are the past inputs, returned
  unchanged (both runtimes keep the prompt step's).
Both branches read one copy of the weights: the two traced graphs' initializers are merged by content.

`logits` holds the last position only (both runtimes read `logits[:, -1]`). The suppress tokens are added to
it in the graph, and the begin-suppress tokens on the prompt step, because onnx-asr takes the plain argmax;
transformers.js applies the same rules again from generation_config.json, which changes nothing.

The arithmetic (float, or the QDQ of the QAT scales) is `qat.onnx_export._Graph`'s, the slim graphs', with
the keys and values cached as float on their int8 grid (re-quantizing an on-grid value is exact).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from qat.onnx_export import _DecoderGraph, _EncoderGraph, _NEG, _no_heads, _onnx_export

ONNX_DIR = "onnx"
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "added_tokens.json")


def graph_files(mode: str) -> tuple[str, str]:
    """(encoder, decoder) paths inside the export: `_quantized` names for the INT8 modes."""
    q = "" if mode == "float" else "_quantized"
    return f"{ONNX_DIR}/encoder_model{q}.onnx", f"{ONNX_DIR}/decoder_model_merged{q}.onnx"


def _none_of(x, head_dim: int):
    """(B, 0, T, D) from x (B, T, C): the K/V of a layer whose heads are all pruned (shapes from x)."""
    return x[:, :, :head_dim].unsqueeze(1)[:, :0]


class _HfEncoder(_EncoderGraph):
    def forward(self, input_features):
        return self.hidden(input_features)


class _HfDecoder(_DecoderGraph):
    """One branch of the merged decoder: `cached` False for the prompt step, True for the later steps."""

    def __init__(self, model, plan, decode, cached: bool):
        super().__init__(model, plan)
        self.cached = cached
        # the token ids (not a vocabulary-sized mask, which each branch would store once more)
        suppress = list(decode.suppress_tokens) + ([] if cached else list(decode.begin_suppress_tokens))
        self.register_buffer("suppress_ids", torch.tensor(sorted(set(suppress)), dtype=torch.int64))
        self.head_dim = self.decoder.layers[0].self_attn.head_dim
        with_heads = [i for i, h in enumerate(self.self_heads) if h]
        if not with_heads:
            raise ValueError("the hf layout takes the position from a self-attention cache, and every decoder "
                             "self-attention head of this model is pruned")
        self.position_layer = with_heads[0]

    def forward(self, input_ids, *args):
        """cached: args = per layer (decoder key, decoder value, encoder key, encoder value); else
        args = (encoder_hidden_states,). Returns logits, then per layer the four present tensors."""
        d, D = self.decoder, self.head_dim
        T = input_ids.shape[1]
        if self.cached:
            pasts = [args[4 * i: 4 * i + 4] for i in range(len(d.layers))]
            start = pasts[self.position_layer][0].shape[2]
        else:
            ehs, start = args[0], 0
        pos = start + torch.arange(T, dtype=torch.int64)
        x = self.embed(input_ids) + torch.nn.functional.embedding(pos, d.embed_positions.weight)
        q_pos = torch.arange(T, dtype=torch.int64)[:, None] + start
        mask = torch.where(torch.arange(start + T, dtype=torch.int64)[None, :] > q_pos, _NEG, 0.0)
        presents = []
        for i, layer in enumerate(d.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
                kv = (_none_of(h, D), _none_of(h, D))
                if self.cached:
                    kv = tuple(torch.cat([p, n], 2) for p, n in zip(pasts[i][:2], kv))
            else:
                past = (pasts[i][0].transpose(2, 3), pasts[i][1]) if self.cached else None
                out, (k_t, v) = self.self_attention(attn, h, past=past, mask=lambda S: mask)
                x = x + out
                kv = (k_t.transpose(2, 3), v)
            attn = layer.encoder_attn
            h = layer.encoder_attn_layer_norm(x)
            if self.cached:
                cross = tuple(pasts[i][2:])
            elif attn.num_heads == 0:
                cross = (_none_of(ehs, D), _none_of(ehs, D))
            if attn.num_heads == 0:
                x = x + _no_heads(attn, h)
            else:
                if self.cached:
                    k_t, v = self.kv_grid(attn, cross[0].transpose(2, 3), cross[1])  # on-grid: the DQ for int8
                else:
                    k, v = self.linears(ehs, [attn.k_proj, attn.v_proj])
                    k_t, v = self.split_kv(attn, k, v)
                    cross = (k_t.transpose(2, 3), v)
                q = self.split_q(attn, self.linear(h, attn.q_proj))
                x = x + self.merge(attn, self.attend(attn, q, k_t, v))
            x = x + self.mlp(layer, layer.final_layer_norm(x))
            presents += [*kv, *cross]
        logits = self.logits(d.layer_norm(x[:, -1]))
        if len(self.suppress_ids):
            logits = logits.index_fill(1, self.suppress_ids, float("-inf"))
        return (logits.unsqueeze(1), *presents)


def _layer_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for part in ("decoder", "encoder")
            for kv in ("key", "value")]


def merge_branches(cond: str, then_path: Path, else_path: Path, inputs: list, out: Path) -> None:
    """One model whose only node is `If(cond)` over the two graphs, their weights stored once.

    Both graphs must have the same outputs (names and order); each reads the graph inputs it needs by name
    (a branch sees the outer graph's inputs and initializers). Initializers equal in dtype, shape and bytes
    are kept once; every other name in a branch is prefixed with the branch's tag, so nothing is shadowed.
    onnx has no such merge (its `compose` joins graphs in sequence), hence this.
    """
    import onnx
    from onnx import helper, numpy_helper

    models = {"cached": onnx.load(str(then_path)), "prompt": onnx.load(str(else_path))}
    outer = {i.name for i in inputs}
    shared, seen_names, initializers = {}, set(), []
    branches = {}
    for tag, m in models.items():
        g = m.graph
        rename = {}
        for init in g.initializer:
            a = numpy_helper.to_array(init)
            key = (init.data_type, tuple(init.dims), hashlib.sha256(a.tobytes()).hexdigest())
            if key not in shared:
                name, n = init.name, 0
                while name in seen_names or name in outer:
                    n += 1
                    name = f"{init.name}__{n}"
                seen_names.add(name)
                shared[key] = name
                t = onnx.TensorProto()
                t.CopyFrom(init)
                t.name = name
                initializers.append(t)
            rename[init.name] = shared[key]
        mine = {i.name for i in g.input}
        if not mine <= outer:
            raise ValueError(f"{tag} graph reads inputs the merged model lacks: {sorted(mine - outer)}")

        def ref(name, tag=tag, rename=rename, mine=mine):
            if not name or name in mine:
                return name
            return rename.get(name, f"{tag}/{name}")

        nodes = []
        for node in g.node:
            n = onnx.NodeProto()
            n.CopyFrom(node)
            n.name = f"{tag}/{node.name}"
            n.input[:] = [ref(x) for x in node.input]
            n.output[:] = [f"{tag}/{x}" for x in node.output]
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ValueError(f"{tag}: node {node.name} has a subgraph, which merge_branches does not rename")
            nodes.append(n)
        outs = []
        for o in g.output:
            v = onnx.ValueInfoProto()
            v.CopyFrom(o)
            src = ref(o.name)
            if src == o.name or src in seen_names:  # an input or a weight handed out as it is
                v.name = f"{tag}/out/{o.name}"
                nodes.append(helper.make_node("Identity", [src], [v.name], name=f"{tag}/identity/{o.name}"))
            else:
                v.name = src
            outs.append(v)
        infos = []
        for vi in g.value_info:
            if vi.name in mine or vi.name in rename:
                continue
            v = onnx.ValueInfoProto()
            v.CopyFrom(vi)
            v.name = f"{tag}/{vi.name}"
            infos.append(v)
        branches[tag] = helper.make_graph(nodes, tag, [], outs, value_info=infos)
    out_names = [o.name for o in models["cached"].graph.output]
    if out_names != [o.name for o in models["prompt"].graph.output]:
        raise ValueError("the two branches have different outputs")
    node = helper.make_node("If", [cond], out_names, name="use_cache_branch",
                            then_branch=branches["cached"], else_branch=branches["prompt"])
    main_outs = []
    for o in models["cached"].graph.output:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        main_outs.append(v)
    graph = helper.make_graph([node], "decoder_model_merged", inputs, main_outs, initializer=initializers)
    src = models["cached"]
    merged = helper.make_model(graph, opset_imports=list(src.opset_import), producer_name="whisper-slim")
    merged.ir_version = src.ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))


def write_configs(model, processor, out: Path) -> None:
    """config.json, generation_config.json, preprocessor_config.json and the tokenizer files, as the
    runtimes read them (onnx-asr reads vocab.json and added_tokens.json, which transformers 5 no longer writes)."""
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    processor.feature_extractor.to_json_file(str(out / "preprocessor_config.json"))
    processor.tokenizer.save_pretrained(out)
    tok = json.loads((out / "tokenizer.json").read_text())
    if not (out / "vocab.json").exists():
        (out / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False))
    if not (out / "added_tokens.json").exists():
        added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
        (out / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False, indent=2))


def export_graphs(model, plan, decode, processor, tmp: Path, opset: int, mode: str, per_channel: bool = False) -> dict:
    """Write the hf layout into `tmp`; returns what export_config.json records of it. In mode dynamic-int8
    the decoder's two branches are quantized before they are merged (ORT's quantizer works on a plain
    graph), so the caller quantizes only the encoder (`quantized` lists the graphs already done)."""
    import onnx

    from qat.onnx_export import _quantize_dynamic

    ENCODER, DECODER = graph_files(mode)
    cfg = model.config
    L, frames = cfg.decoder_layers, cfg.max_source_positions
    (tmp / ONNX_DIR).mkdir(parents=True, exist_ok=True)
    enc = _HfEncoder(model, plan).eval()
    feats = torch.zeros(1, cfg.num_mel_bins, 2 * frames)
    _onnx_export(enc, (feats,), tmp / ENCODER, ["input_features"], ["last_hidden_state"],
                 {"input_features": {0: "batch_size", 2: "feature_sequence_length"},
                  "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"}}, opset)

    past, present = _layer_names("past_key_values", L), _layer_names("present", L)
    axes = {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
            "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size"}}
    for n in past:
        axes[n] = {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in n
                   else "encoder_sequence_length_out"}
    for n in present:
        axes[n] = {0: "batch_size", 2: "total_decoder_sequence_length" if ".decoder." in n
                   else "encoder_sequence_length_out"}
    ehs = torch.zeros(1, frames, cfg.d_model)
    P, T = 3, 2
    tensors = []
    for layer in model.model.decoder.layers:
        H, C, D = layer.self_attn.num_heads, layer.encoder_attn.num_heads, layer.self_attn.head_dim
        tensors += [torch.zeros(1, H, P, D), torch.zeros(1, H, P, D),
                    torch.zeros(1, C, frames, D), torch.zeros(1, C, frames, D)]
    sot = int(decode.prompt[0])
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        for cached in (False, True):
            dec = _HfDecoder(model, plan, decode, cached=cached).eval()
            ids = torch.full((1, T if cached else len(decode.prompt)), sot, dtype=torch.int64)
            args, names = ((ids, *tensors), ["input_ids"] + past) if cached else \
                ((ids, ehs), ["input_ids", "encoder_hidden_states"])
            path = t / f"{'cached' if cached else 'prompt'}.onnx"
            _onnx_export(dec, args, path, names, ["logits"] + present,
                         {k: v for k, v in axes.items() if k in names or k == "logits" or k in present}, opset)
            if mode == "dynamic-int8":
                _quantize_dynamic(path, per_channel)
        by_name = {i.name: i for f in ("prompt", "cached") for i in onnx.load(str(t / f"{f}.onnx")).graph.input}
        cond = onnx.helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
        inputs = [by_name[n] for n in ["input_ids", "encoder_hidden_states"] + past] + [cond]
        merge_branches("use_cache_branch", t / "cached.onnx", t / "prompt.onnx", inputs, tmp / DECODER)
    write_configs(model, processor, tmp)
    return {"encoder": ENCODER, "decoder": DECODER, "required": [ENCODER, DECODER, *CONFIG_FILES],
            "quantized": [DECODER] if mode == "dynamic-int8" else []}


def check_dir(d: str | Path) -> dict:
    """The export config of an hf export directory whose files are all there; ExportDirError names the file
    that is missing or wrong."""
    from slim.export_format import load_export_config

    return load_export_config(d, layout="hf")
