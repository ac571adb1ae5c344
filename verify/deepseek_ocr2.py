"""DeepSeek-OCR 2 against its ground truth, `transformers`' `DeepseekOcr2ForConditionalGeneration`, node by node.

The reference is the whole model, unmodified, built from `costgraph.graphs.deepseek_ocr2.config` (the released
sizes) with random weights: SDPA in the vision tower (SAM's only implementations are eager and SDPA; the
encoder's hybrid mask goes to SDPA as an explicit mask), eager attention in the language model (the one
variant a CPU run can check, as for DeepSeek-OCR), eager experts (`grouped_mm` is invisible to the FLOP
counter). Full size: modules are made on `meta` and, for a CPU run, given storage filled by tiling one seeded
random block (`costgraph.verify.lm_reference`: no slow random init), in bf16 (the router stays fp32).

What runs where is labelled without touching the computation: forward hooks on the vision tower and the
projector mark the global view and the crop batch (the model runs the global view first), the projector's
return marks the image-slot assembly ("vision"), and the model's `get_placeholder_mask` marks the start of
the language model's part of the prefill; the decode forwards are labelled by the loop.

- Vision FLOPs (`meta` or CPU): `OpCounter` per (section, module, torch call), joined to the graph's nodes by
  `FLOP_RULES`. On CPU the fused SDPA has no torch formula; `costgraph.verify.profile` adds it.
- Vision elementwise FLOPs and bytes (CPU): every aten op (`MetricRecorder`) joined by `METRIC_RULES`. A claim
  names (module, torch call, aten op); its occurrence is assigned in the graph's execution order among the
  nodes that cost something (one module runs several alike: SAM's attention runs three reshape copies when it
  attends over several windows, one when over a single view).
- Language model (CPU only): the recorded calls of the decoder sections, their module paths written as
  `costgraph.verify.lm_profile` names them (`model.language_model.X` -> `model.X`, the multimodal model's own
  ops -> the root), compared by `lm_profile.compare_lm` against this model's graph.
- A page image goes through the real processor: `DeepseekOcr2ImageProcessorPil` (the torchvision backend
  needs torchvision, not a dependency here; both apply the same crop rule, and their tensors have the same
  shapes, which is all the costs depend on). The processor's crop count is checked against the layout rule.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from functools import lru_cache

import torch

from costgraph.dtypes import STORAGE, torch_dtype
from costgraph.evaluate import substitute
from costgraph.graph import within
from costgraph.graphs.deepseek_ocr.config import LMConfig
from costgraph.graphs.deepseek_ocr2 import RELEASED_PARAMETERS, assembly, decoder, layout as L
from costgraph.graphs.deepseek_ocr2 import symbols as S
from costgraph.graphs.deepseek_ocr2.config import IMAGE_TOKEN_ID, LM, MAX_CROPS, MAX_POSITIONS, MODES, VISION, \
    VisionConfig
from .compare import Comparison, Row
from .dispatch import MetricRecorder
from .lm_profile import PREFILL, DECODE, CallLog, LMRun, _cache_bytes, compare_lm, router_log, section as lm_section
from .lm_reference import _default_dtype, _fill
from .profile import COMPUTE_OP

MODE = MODES["default"]

TORCH_DTYPES = {name: torch_dtype(name) for name in STORAGE}
_DTYPE_BYTES = {TORCH_DTYPES[name]: n for name, n in STORAGE.items()}


# ---- the reference ---------------------------------------------------------------------------------------

def image_token_id(lm: LMConfig = LM) -> int:
    """The release's image token; a small test vocabulary uses its last id."""
    return IMAGE_TOKEN_ID if lm.vocab > IMAGE_TOKEN_ID else lm.vocab - 1


def reference_config(cfg: VisionConfig = VISION, lm: LMConfig = LM):
    from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2Config

    s, e = cfg.sam, cfg.encoder
    text = dict(vocab_size=lm.vocab, hidden_size=lm.hidden, intermediate_size=lm.dense_intermediate,
                num_hidden_layers=lm.layers, num_attention_heads=lm.heads, num_key_value_heads=lm.heads,
                n_routed_experts=lm.routed_experts, num_experts_per_tok=lm.experts_per_token,
                moe_intermediate_size=lm.moe_intermediate, n_shared_experts=lm.shared_experts,
                routed_scaling_factor=lm.routed_scaling, topk_method="greedy", n_group=1, topk_group=1,
                mlp_layer_types=list(lm.mlp_layer_types), rms_norm_eps=lm.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
                max_position_embeddings=MAX_POSITIONS, bos_token_id=0, eos_token_id=1)
    vision = {"sam_config": dict(hidden_size=s.width, num_hidden_layers=s.depth, num_attention_heads=s.heads,
                                 mlp_dim=s.mlp_dim, window_size=s.window, global_attn_indexes=list(s.global_blocks),
                                 output_channels=s.neck_channels, downsample_channels=list(s.compressor_channels),
                                 image_size=s.pretrain_grid * cfg.patch_size, patch_size=cfg.patch_size,
                                 layer_norm_eps=s.layer_norm_eps),
              "encoder_config": dict(hidden_size=e.width, num_hidden_layers=e.depth, num_attention_heads=e.heads,
                                     num_key_value_heads=e.kv_heads, intermediate_size=e.mlp_dim,
                                     rms_norm_eps=e.rms_norm_eps, vocab_size=1,
                                     rope_parameters={"rope_type": "default", "rope_theta": e.rope_theta})}
    c = DeepseekOcr2Config(text_config=text, vision_config=vision, image_token_id=image_token_id(lm),
                           experts_implementation="eager")
    c.text_config._attn_implementation = "eager"
    for sub in (c.vision_config, c.vision_config.sam_config, c.vision_config.encoder_config):
        sub._attn_implementation = "sdpa"
    return c


LANGUAGE_MODEL = ("model.language_model", "lm_head")   # the parts a CPU run of the language model alone needs


def build_reference(device: str = "meta", dtype: torch.dtype = torch.bfloat16, cfg: VisionConfig = VISION,
                    lm: LMConfig = LM, seed: int = 0, parts: tuple[str, ...] | None = None):
    """`DeepseekOcr2ForConditionalGeneration` with random weights (meta: shapes only). `parts`: the submodules
    given storage on `device` (e.g. `LANGUAGE_MODEL`); the rest stays on meta (None: the whole model)."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2ForConditionalGeneration

    with torch.device("meta"), _default_dtype(dtype):
        model = DeepseekOcr2ForConditionalGeneration(reference_config(cfg, lm))
    if device != "meta":
        if parts is None:
            model = model.to_empty(device=device)
        else:
            for part in parts:
                model.get_submodule(part).to_empty(device=device)
        real = [(n, p) for n, p in model.named_parameters() if p.device.type != "meta"]
        _fill([p.data for n, p in real if not n.endswith("norm.weight")
               and "layer_norm" not in n and "layernorm" not in n], seed)
        for n, p in real:
            if n.endswith("norm.weight") or ("layer_norm" in n and n.endswith("weight")):
                p.data.fill_(1.0)
            elif "layer_norm" in n and n.endswith("bias"):
                p.data.zero_()
        for mod in model.modules():   # RoPE inverse frequencies are computed, not loaded
            if hasattr(mod, "compute_default_rope_parameters") and hasattr(mod, "inv_freq") \
                    and mod.inv_freq.device.type != "meta":
                inv, _ = mod.compute_default_rope_parameters(mod.config)
                mod.inv_freq, mod.original_inv_freq = inv.clone(), inv.clone()
    for name, p in model.named_parameters():
        want = torch.float32 if name.endswith("mlp.gate.weight") else dtype
        if p.dtype != want:
            raise RuntimeError(f"reference weight {name} is {p.dtype}, expected {want}")
    return model.eval()


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@lru_cache(maxsize=1)
def meta_reference():
    return build_reference("meta")


# ---- labelling what runs ---------------------------------------------------------------------------------

class Labels:
    """Sets the section of every recorder (`scope`) from module hooks; see the module docstring."""

    def __init__(self, model, recorders):
        self.model, self.recorders, self.handles, self.views = model, [r for r in recorders if r is not None], [], 0

    def set(self, name: str) -> None:
        for r in self.recorders:
            r.scope = name

    def __enter__(self):
        mm = self.model.model

        def tower(mod, args):
            self.set("vision.global" if self.views == 0 else "vision.crops")
            self.views += 1

        self.handles.append(mm.vision_tower.register_forward_pre_hook(tower))
        self.handles.append(mm.multi_modal_projector.register_forward_hook(lambda *a: self.set("vision")))
        original = mm.get_placeholder_mask

        def placeholder(*args, **kwargs):
            self.set(PREFILL)
            return original(*args, **kwargs)

        mm.get_placeholder_mask = placeholder
        self._original = original
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        del self.model.model.get_placeholder_mask   # back to the class's method
        return False


class VisionPart(torch.nn.Module):
    """The vision half of `DeepseekOcr2Model.forward` (for runs without the language model): the image
    features of one page, then forward()'s concatenation of the per-image list. Holding the multimodal model
    as `model`, its modules keep the names they have in the whole model (`model.vision_tower...`)."""

    def __init__(self, mm):
        super().__init__()
        self.model = mm

    def forward(self, pixels, local, num_local):
        feats = self.model.get_image_features(pixels, local, num_local)
        return torch.cat(feats.pooler_output, dim=0)


# ---- one page through the processor ----------------------------------------------------------------------

def processor_inputs(path: str, max_num: int = MAX_CROPS):
    """The page through `DeepseekOcr2ImageProcessorPil` (the vendor's load: EXIF-transposed, RGB)."""
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil
    from costgraph.graphs.pages import open_page

    with open_page(path) as img:
        out = DeepseekOcr2ImageProcessorPil()(images=img, return_tensors="pt", max_patches=max_num)
        lay = L.layout_for(img.size[0], img.size[1], MODE, max_num=max_num)
    crops = int(out["num_local_patches"][0])
    if crops != lay.num_crops:
        raise RuntimeError(f"the processor cut {crops} crops, the layout rule says {lay.num_crops} ({lay})")
    local = out.get("pixel_values_local")
    return lay, out["pixel_values"], (local if crops else None)


def synthetic_inputs(lay, device: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.empty(*s, device="meta", dtype=dtype)) if device == "meta" else \
        (lambda *s: torch.randn(*s, generator=gen).to(dtype))
    g = make(1, 3, MODE.base_size, MODE.base_size)
    loc = make(lay.num_crops, 3, MODE.image_size, MODE.image_size) if lay.tiled else None
    return g, loc


def prompt_ids(lay, text_tokens: int, seed: int = 0, lm: LMConfig = LM) -> torch.Tensor:
    """[BOS] + image slots (the image token) + text (random ids that are not the image token)."""
    slots = L.tokens_for(lay, MODE)["total"]
    gen = torch.Generator().manual_seed(seed)
    image = image_token_id(lm)
    ids = torch.randint(2, image, (1, 1 + slots + text_tokens), generator=gen)
    ids[0, 0] = 0
    ids[0, 1:1 + slots] = image
    return ids


# ---- the graph's side ------------------------------------------------------------------------------------

SP, ENC, PROJ = "model.vision_tower.sam_encoder", "model.vision_tower.vision_encoder", "model.multi_modal_projector"
LIN, CONV, SDPA = "linear", "conv2d", "scaled_dot_product_attention"
_B, _A, _E = SP + ".layers.{0}", SP + ".layers.{0}.attn", ENC + ".layers.{0}"

# node path (in its view scope) -> [(module, torch call)]: FLOPs
FLOP_RULES = [
    (r"sam\.patch_embed\.proj", [(SP + ".patch_embed.projection", CONV)]),
    (r"sam\.blocks\.(\d+)\.attn\.(qkv|proj)", [(_A + ".{1}", LIN)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_h", [(_A, "einsum:bhwc,hkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w", [(_A, "einsum:bhwc,wkc->bhwk")]),
    (r"sam\.blocks\.(\d+)\.attn\.sdpa", [(_A, SDPA)]),
    (r"sam\.blocks\.(\d+)\.mlp\.(lin[12])", [(_B + ".mlp.{1}", LIN)]),
    (r"sam\.neck\.0", [(SP + ".neck.conv1", CONV)]),
    (r"sam\.neck\.2", [(SP + ".neck.conv2", CONV)]),
    (r"sam\.net_2", [(SP + ".proj.conv1", CONV)]),
    (r"sam\.net_3", [(SP + ".proj.conv2", CONV)]),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkvo])_proj", [(_E + ".self_attn.{1}_proj", LIN)]),
    (r"encoder\.layers\.(\d+)\.self_attn\.sdpa", [(_E + ".self_attn", SDPA)]),
    (r"encoder\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)", [(_E + ".mlp.{1}", LIN)]),
    (r"projector", [(PROJ, LIN)]),
]

_COORDS = [("arange", "arange"), ("arange", "arange"), ("mul", "mul"), ("mul", "mul"), ("sub", "sub"),
           ("add", "add"), ("long", "_to_copy")]
_ROPE = [("mul", "mul"), ("neg", "neg"), ("cat", "cat"), ("mul", "mul"), ("add", "add")]
_MASK = [("full", "full"), ("__setitem__", "fill_"), ("arange", "arange"), ("arange", "arange"),
         ("arange", "arange"), ("add", "add"), ("arange", "arange"), ("add", "add"), ("new_zeros", "new_zeros"),
         ("le", "le"), ("__or__", "bitwise_or"), ("__getitem__", "index"), ("__getitem__", "index"),
         ("__eq__", "eq"), ("ge", "ge"), ("__and__", "bitwise_and"), ("__or__", "bitwise_or")]
ALL = None   # every op of the module (a node that is a whole module)

# node path -> [(module, torch call, aten op)]: elementwise FLOPs and bytes; occurrences assigned in graph order
METRIC_RULES = [
    (r"sam\.patch_embed\.proj", [(SP + ".patch_embed.projection", ALL, ALL)]),
    (r"sam\.pos_embed\.to_fp32", [(SP, "to", "_to_copy")]),
    (r"sam\.pos_embed\.resize", [(SP, "interpolate", ALL)]),
    (r"sam\.pos_embed\.to_storage", [(SP, "to", "_to_copy")]),
    (r"sam\.pos_embed\.add", [(SP, "add", "add")]),
    (r"sam\.blocks\.(\d+)\.(norm[12])", [(_B + ".layer_{1}", ALL, ALL)]),
    (r"sam\.blocks\.(\d+)\.window_partition\.pad", [(_B, "pad", "constant_pad_nd")]),
    (r"sam\.blocks\.(\d+)\.window_(un)?partition(\.unpad)?", [(_B, "contiguous", "clone")]),
    (r"sam\.blocks\.(\d+)\.attn\.(qkv|proj)", [(_A + ".{1}", ALL, ALL)]),
    (r"sam\.blocks\.(\d+)\.attn\.(split_heads|merge_heads|rel_pos_mask\.view)", [(_A, "reshape", "clone")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_[hw]\.resize", [(_A, "interpolate", "upsample_linear1d")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_[hw]\.coords", [(_A, c, o) for c, o in _COORDS]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_[hw]\.gather", [(_A, "__getitem__", "index")]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_h", [(_A, "einsum:bhwc,hkc->bhwk", ALL)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_w", [(_A, "einsum:bhwc,wkc->bhwk", ALL)]),
    (r"sam\.blocks\.(\d+)\.attn\.rel_pos_mask", [(_A, "add", "add")]),
    (r"sam\.blocks\.(\d+)\.attn\.sdpa", [(_A, SDPA, ALL)]),
    (r"sam\.blocks\.(\d+)\.residual[12]", [(_B, "add", "add")]),
    (r"sam\.blocks\.(\d+)\.mlp\.(lin[12]|act)", [(_B + ".mlp.{1}", ALL, ALL)]),
    (r"sam\.neck\.0", [(SP + ".neck.conv1", ALL, ALL)]),
    (r"sam\.neck\.1", [(SP + ".neck.layer_norm1", ALL, ALL)]),
    (r"sam\.neck\.2", [(SP + ".neck.conv2", ALL, ALL)]),
    (r"sam\.neck\.3", [(SP + ".neck.layer_norm2", ALL, ALL)]),
    (r"sam\.net_2", [(SP + ".proj.conv1", ALL, ALL)]),
    (r"sam\.net_3", [(SP + ".proj.conv2", ALL, ALL)]),
    (r"encoder\.cat", [("model.vision_tower", "cat", "cat")]),
    (r"encoder\.position_ids", [(ENC, "arange", "arange")]),
    (r"encoder\.attention_mask", [(ENC, c, o) for c, o in _MASK]),
    (r"encoder\.rotary_emb", [(ENC + ".rotary_emb", ALL, ALL)]),
    (r"encoder\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)", [(_E + ".{1}", ALL, ALL)]),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkvo]_proj)", [(_E + ".self_attn.{1}", ALL, ALL)]),
    (r"encoder\.layers\.(\d+)\.self_attn\.rotary_[qk]", [(_E + ".self_attn", c, o) for c, o in _ROPE]),
    (r"encoder\.layers\.(\d+)\.self_attn\.repeat_[kv]", [(_E + ".self_attn", "reshape", "clone")]),
    (r"encoder\.layers\.(\d+)\.self_attn\.mask_to_float",
     [(_E + ".self_attn", SDPA, "scalar_tensor"), (_E + ".self_attn", SDPA, "scalar_tensor"),
      (_E + ".self_attn", SDPA, "where")]),
    (r"encoder\.layers\.(\d+)\.self_attn\.sdpa", [(_E + ".self_attn", SDPA, "_scaled_dot_product_flash_attention_for_cpu")]),
    (r"encoder\.layers\.(\d+)\.residual_(attn|mlp)", [(_E, "add", "add")]),
    (r"encoder\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|act_fn)", [(_E + ".mlp.{1}", ALL, ALL)]),
    (r"encoder\.layers\.(\d+)\.mlp\.mul", [(_E + ".mlp", "mul", "mul")]),
    (r"encoder\.norm", [(ENC + ".norm", ALL, ALL)]),
    (r"projector", [(PROJ, LIN, "addmm"), (PROJ, LIN, "mm")]),
    (r"projector\.flatten", [(PROJ, LIN, "clone")]),
    (r"projector\.bias_add", [(PROJ, LIN, "add")]),
    (r"assemble\.(sequence|batch_cat)", [("model", "cat", "cat")]),
]


def _rule(rules, path: str):
    hits = [(m, claims) for rx, claims in rules if (m := re.fullmatch(rx, path))]
    if len(hits) != 1:
        raise KeyError(f"node path {path!r} matches {len(hits)} mapping rules (need exactly 1)")
    m, claims = hits[0]
    return [tuple(t.format(*m.groups()) if i == 0 else t for i, t in enumerate(c)) for c in claims]


def flop_claims(graph, scope: str) -> dict[str, list[tuple[str, str]]]:
    return {n: _rule(FLOP_RULES, graph.g.nodes[n]["path"]) for n in graph.nodes(scope)
            if graph.g.nodes[n]["scope"] == scope and graph.cost(n).flops != 0}


OP_METRICS = ("elementwise_flops", "bytes_read", "bytes_written")


def metric_claims(graph, scope: str, values: dict) -> dict[str, list[tuple]]:
    """Each node of `scope` with a non-zero metric at `values` -> its (module, call, op, occurrence) claims;
    occurrences counted in execution (graph) order per (module, call, op)."""
    seen: dict[tuple, int] = defaultdict(int)
    out = {}
    for n in graph.nodes(scope):
        if graph.g.nodes[n]["scope"] != scope:
            continue
        cost = graph.cost(n)
        if not any(substitute(cost[m], values) for m in OP_METRICS):
            continue
        claims = []
        for module, call, op in _rule(METRIC_RULES, graph.g.nodes[n]["path"]):
            if op is ALL:
                claims.append((module, call, op, None))
            else:
                claims.append((module, call, op, seen[(module, call, op)]))
                seen[(module, call, op)] += 1
        out[n] = claims
    return out


# ---- comparing the vision part ---------------------------------------------------------------------------

def _values(lay, dtype_bytes: int, text_tokens: int = 0, output_tokens: int = 1) -> dict:
    return {S.w_crop: lay.w_crop, S.h_crop: lay.h_crop, S.dtype_bytes: dtype_bytes, S.text_tokens: text_tokens,
            S.output_tokens: output_tokens}


def compare_vision(graph, lay, counter_records, calls, dtype_bytes: int) -> tuple[list[Row], list[Row], list]:
    """FLOPs node by node (and with `calls`, a CPU run's aten ops, the other metrics), subtotals per scope."""
    values = _values(lay, dtype_bytes)
    scopes = [s for s in assembly.SCOPES if s != "vision.crops" or lay.tiled]
    rows, subtotals, unclaimed, claimed = [], [], [], set()
    for scope in scopes[1:]:
        for node, claims in flop_claims(graph, scope).items():
            keys = {(scope, m, c) for m, c in claims}
            claimed |= keys
            got = sum(n for k, n in counter_records.items() if k[:3] in keys)
            rows.append(Row(node, "flops", substitute(graph.effective_cost(node).flops, values), int(got),
                            "; ".join(f"{m} [{c}]" for m, c in claims)))
    for s in scopes:
        subtotals.append(Row(s, "flops", substitute(graph.total(s).flops, values),
                             int(sum(n for k, n in counter_records.items() if within(k[0], s))), "all counted ops"))
    unclaimed += [(f"{k[0]}:{k[1] or '<root>'}", f"{k[2]}/{k[3]}", int(n)) for k, n in counter_records.items()
                  if n and k[:3] not in claimed and within(k[0], "vision")]
    if calls is None:
        return rows, subtotals, unclaimed
    occ, seen = [], defaultdict(int)
    for c in calls:
        key = (c.section, c.module, c.call, c.op)
        occ.append(seen[key])
        seen[key] += 1
    owner: dict[int, str] = {}
    for scope in scopes:
        for node, claims in metric_claims(graph, scope, values).items():
            mine = [i for i, c in enumerate(calls) if c.section == scope and any(
                c.module == m and (call is None or c.call == call) and (op is None or c.op == op)
                and (k is None or occ[i] == k) for m, call, op, k in claims)]
            for i in mine:
                if owner.setdefault(i, node) != node:
                    raise ValueError(f"aten op {calls[i]} claimed by {owner[i]} and {node}")
            cost = graph.effective_cost(node)
            for m in OP_METRICS:
                rows.append(Row(node, m, substitute(cost[m], values), sum(getattr(calls[i], m) for i in mine),
                                "; ".join(f"{a} {b or ''} {c or ''}#{'*' if d is None else d}" for a, b, c, d in claims)))
    for s in scopes:
        for m in OP_METRICS:
            subtotals.append(Row(s, m, substitute(graph.total(s)[m], values),
                                 sum(getattr(c, m) for c in calls if within(c.section, s)), "all aten ops"))
    unclaimed += [(f"{c.section}:{c.module or '<root>'}", f"{c.call}/{c.op}#{occ[i]}",
                   c.bytes_read + c.bytes_written + c.elementwise_flops)
                  for i, c in enumerate(calls) if within(c.section, "vision") and i not in owner
                  and (c.elementwise_flops or c.bytes_read or c.bytes_written)]
    return rows, subtotals, unclaimed


def verify_vision_case(model, lay, pixels, local, *, metrics: bool, dtype: torch.dtype, device: str,
                       cfg: VisionConfig = VISION) -> Comparison:
    """One page's vision (global view, crops, assembly) under the counter (and on CPU the recorder)."""
    from .profile import OpCounter

    t = time.perf_counter()
    counter = OpCounter()
    rec = MetricRecorder() if metrics else None
    pixels = pixels.to(device=device, dtype=dtype)
    local = None if local is None else local.to(device=device, dtype=dtype)
    page = VisionPart(model.model)
    with counter, (rec if rec is not None else contextlib.nullcontext()), torch.no_grad(), \
            Labels(model, [counter, rec]) as labels:
        labels.set("vision")
        seq = page(pixels, local, [lay.num_crops] if local is not None else None)
    graph = assembly.vision_graph(cfg)
    # the wrapper's own ops (the two cats) are the multimodal model's in a full forward
    records = {((k[0], "model", *k[2:]) if k[1] == "" else k): n for k, n in counter.records.items()}
    calls = None if rec is None else [c if c.module else type(c)(c.section, "model", *[
        getattr(c, f) for f in ("call", "op", "elementwise_flops", "bytes_read", "bytes_written", "out_shapes",
                                "in_shapes")]) for c in rec.calls]
    rows, subtotals, unclaimed = compare_vision(graph, lay, records, calls, _DTYPE_BYTES[dtype])
    slots = int(substitute(L.image_tokens(MODE)["total"], _values(lay, 2)))
    rows.append(Row("vision.assemble.batch_cat", "slots", slots, int(seq.shape[0]), "image features rows"))
    blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in counter.uncounted if COMPUTE_OP.fullmatch(k[3])]
    grid = f"{lay.w_crop}x{lay.h_crop}" if lay.tiled else "no crops"
    info = {"mode": MODE.name, "layout": lay.as_dict(), "grid": grid, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "metrics": ["flops"] + (list(OP_METRICS) if metrics else []),
            "seconds": round(time.perf_counter() - t, 3)}
    return Comparison(f"deepseek-ocr-2 {lay.width}x{lay.height} ({grid}) vision", rows, subtotals, unclaimed,
                      blind, info)


# ---- the language model (and the whole page) -------------------------------------------------------------

def _lm_module(module: str) -> str:
    """A recorded module path as `costgraph.verify.lm_profile` names the language model's parts."""
    if module == "model":
        return ""
    if module.startswith("model.language_model"):
        return "model" + module[len("model.language_model"):]
    return module


def run_page(model, lay, pixels, local, *, text_tokens: int, decode_steps: int, lm_head: str, metrics: bool,
             seed: int = 0, lm: LMConfig = LM, batch: int = 1):
    """Prefill (vision + LM, one forward of the real model) and `decode_steps` greedy forwards with a cache.
    `batch`: B copies of the page run together (B prompts of different text, one batched forward per step,
    as serving batches them). Returns (counter records of the vision sections, vision aten ops, the LM run
    in lm_profile's terms)."""
    from transformers import DynamicCache

    ids = torch.cat([prompt_ids(lay, text_tokens, seed + i, lm) for i in range(batch)])
    if batch != 1:
        pixels = pixels.expand(batch, *pixels.shape[1:]).contiguous()
        local = None if local is None else local.repeat(batch, 1, 1, 1)
    dtype = model.lm_head.weight.dtype
    log = CallLog()
    rec = MetricRecorder() if metrics else None
    run = LMRun(ids.shape[1], decode_steps)
    cache = DynamicCache(config=model.config.text_config)
    keep = 1 if lm_head == "last" else 0
    nxt = None
    pixels = pixels.to(dtype)
    local = None if local is None else local.to(dtype)
    with router_log(model.model.language_model.layers) as routes, log, \
            (rec if rec is not None else contextlib.nullcontext()), \
            torch.no_grad(), Labels(model, [log, rec]) as labels:
        for step in range(decode_steps + 1):
            t = time.perf_counter()
            labels.set(lm_section(step))
            if step == 0:
                out = model(input_ids=ids, pixel_values=pixels, cache=cache, use_cache=True,
                            pixel_values_local=local,
                            num_local_patches=[lay.num_crops] * batch if local is not None else None,
                            logits_to_keep=keep)
            else:
                out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=keep)
            labels.set(lm_section(step))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            labels.set("")   # the loop's own bookkeeping (reading the token) is no part of a forward
            run.seconds[lm_section(step)] = round(time.perf_counter() - t, 3)
            run.tokens.append(int(nxt) if batch == 1 else nxt.flatten().tolist())
            run.kv_cache_bytes[step] = _cache_bytes(cache)
    lm_sections = {lm_section(s) for s in range(decode_steps + 1)}
    run.calls = [type(c)(c.section, _lm_module(c.module), c.call, c.op, c.flops)
                 for c in log.calls if c.section in lm_sections]
    vision_records = {k: n for k, n in log.records.items() if within(k[0], "vision")}
    ops = list(rec.calls) if rec is not None else []
    run.ops = [type(c)(c.section, _lm_module(c.module), *[getattr(c, f) for f in
                                                          ("call", "op", "elementwise_flops", "bytes_read",
                                                           "bytes_written", "out_shapes", "in_shapes")])
               for c in ops if c.section in lm_sections]
    run.blind = [f"{k[0]}:{k[1] or '<root>'} {k[2]}/{k[3]}" for k in log.uncounted if COMPUTE_OP.fullmatch(k[3])]
    for layer, per in routes.items():
        for step, idx in enumerate(per):
            run.experts_hit.setdefault(step, {})[layer] = int(torch.unique(idx).numel())
    return vision_records, [c for c in ops if within(c.section, "vision")], run


def verify_page(model, lay, pixels, local, *, text_tokens: int = 10, decode_steps: int = 3, lm_head: str = "last",
                metrics: bool = True, lm: LMConfig = LM, cfg: VisionConfig = VISION) -> Comparison:
    """The whole page on CPU: vision node by node, the language model node group by group, e2e totals."""
    t = time.perf_counter()
    dtype = model.lm_head.weight.dtype
    variants = decoder.variants(lm_head=lm_head)
    vis_records, vis_ops, run = run_page(model, lay, pixels, local, text_tokens=text_tokens,
                                         decode_steps=decode_steps, lm_head=lm_head, metrics=metrics, lm=lm)
    b = _DTYPE_BYTES[dtype]
    v_rows, v_sub, v_un = compare_vision(assembly.vision_graph(cfg), lay, vis_records, vis_ops if metrics else None, b)
    graph = assembly.model_graph(variants, lm, S.experts_hit, cfg)
    names = ("flops",) + (OP_METRICS + ("kv_cache_bytes",) if metrics else ())
    values = {**_values(lay, b, text_tokens)}
    l_rows, l_sub, l_un = compare_lm(graph, values, run, (PREFILL, DECODE), names, lm)
    e2e = []
    for m in names:
        if m == "kv_cache_bytes":
            continue
        vis = next(r for r in v_sub if r.node == "vision" and r.metric == m)
        dec = next(r for r in l_sub if r.node == "decoder" and r.metric == m)
        e2e.append(Row("e2e", m, vis.predicted + dec.predicted, vis.measured + dec.measured,
                       f"vision + decoder (output_tokens = {decode_steps + 1}; experts_hit as the routers ran)"))
    if (lm, cfg) == (LM, VISION):   # the command line's own formula (released sizes)
        cli_flops = substitute(assembly.formula("e2e", "flops", variants), {**values, S.output_tokens: decode_steps + 1})
        e2e.append(Row("e2e (command line)", "flops", cli_flops, e2e[0].measured, "the command line's e2e formula"))
    prefill_hits = run.experts_hit.get(0, {})
    bound = int(decoder.experts_hit_bound(lm, run.prompt_tokens))
    grid = f"{lay.w_crop}x{lay.h_crop}" if lay.tiled else "no crops"
    info = {"mode": MODE.name, "layout": lay.as_dict(), "grid": grid, "device": "cpu",
            "dtype": str(dtype).replace("torch.", ""), "prompt_tokens": run.prompt_tokens,
            "image_tokens": L.tokens_for(lay, MODE)["total"], "text_tokens": text_tokens,
            "decode_steps": decode_steps, "variants": variants.as_dict(), "metrics": list(names),
            "parameters": num_parameters(model),
            "experts_hit": {"prefill": {str(k): v for k, v in prefill_hits.items()}, "predicted_bound": bound},
            "kv_cache_bytes": {lm_section(s): n for s, n in run.kv_cache_bytes.items()},
            "forward_seconds": run.seconds, "seconds": round(time.perf_counter() - t, 3)}
    return Comparison(f"deepseek-ocr-2 {lay.width}x{lay.height} ({grid}) e2e", v_rows + l_rows,
                      e2e + v_sub + l_sub, v_un + l_un, run.blind, info)


def verify_lm_batch(model, lay, pixels, local, *, batch: int, text_tokens: int = 5, decode_steps: int = 2,
                    lm_head: str = "last", lm: LMConfig = LM) -> Comparison:
    """B copies of a page through the real model together (serving's batch): the language model's prefill and
    decode forwards, every metric group by group and the KV cache, against the batched language-model graph
    (`assembly.lm_graph(..., batch=B)`, the graph serving runs) at the experts each router ran."""
    dtype = model.lm_head.weight.dtype
    variants = decoder.variants(lm_head=lm_head)
    _, _, run = run_page(model, lay, pixels, local, text_tokens=text_tokens, decode_steps=decode_steps,
                         lm_head=lm_head, metrics=True, lm=lm, batch=batch)
    graph = assembly.lm_graph(variants, lm, S.experts_hit, batch)
    names = ("flops",) + OP_METRICS + ("kv_cache_bytes",)
    rows, subtotals, unclaimed = compare_lm(graph, _values(lay, _DTYPE_BYTES[dtype], text_tokens), run,
                                            (PREFILL, DECODE), names, lm, batch)
    grid = f"{lay.w_crop}x{lay.h_crop}" if lay.tiled else "no crops"
    info = {"batch": batch, "prompt_tokens": run.prompt_tokens, "decode_steps": decode_steps,
            "variants": variants.as_dict(), "experts_hit": {str(k): v for k, v in run.experts_hit.items()}}
    return Comparison(f"deepseek-ocr-2 language model, batch {batch} ({grid})", rows, subtotals, unclaimed,
                      run.blind, info)


def compare_params(model=None) -> Comparison:
    """Every part of the checkpoint: the graph's resident parameters against the reference's, and the release's."""
    from costgraph import params as P

    model = model or meta_reference()
    g = assembly.model_graph()
    res = P.resident(g)
    tops = {r: P.resident(g, r) for r in ("vision", "decoder")}
    ref = {"vision": sum(p.numel() for n, p in model.named_parameters()
                         if n.startswith(("model.vision_tower", "model.multi_modal_projector", "model.view_separator"))),
           "decoder": sum(p.numel() for n, p in model.named_parameters()
                          if n.startswith(("model.language_model", "lm_head")))}
    rows = [Row(f"params.{k}", "params", int(tops[k].params), v, "reference parameters") for k, v in ref.items()]
    rows.append(Row("params", "params", int(res.params), num_parameters(model), "DeepseekOcr2ForConditionalGeneration"))
    rows.append(Row("params (release)", "params", int(res.params), RELEASED_PARAMETERS, "the release's count"))
    return Comparison("deepseek-ocr-2 parameters", rows, [], [], [], {"device": "meta"})


def all_grid_layouts(max_num: int = MAX_CROPS):
    return [L.layout_for_grid(w, h, MODE) for w, h in L.all_grids(max_num)]

