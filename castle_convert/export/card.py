"""The model card (README.md) of a published directory: front matter + results + usage + recipe.

Rendered from the directory's own ``config.json``, ``report.json`` and ``recipe.yaml``, so
``castle-convert push`` can render it again with the repo id in the usage snippets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

MARKER = "<!-- castle-convert model card: `castle-convert push` re-renders it (delete this line to keep edits) -->"
REQUIRED_KEYS = ("library_name", "pipeline_tag", "tags", "model-index")
REQUIRED_TAGS = ("castling-vit", "linear-attention")

# --data spec -> (Hub dataset id, display name)
_DATASETS = {"fashion-mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST")}
_SPLITS = {"fashion-mnist": "test"}        # the split castle-convert evaluates on, when it is not "validation"


class CardError(ValueError):
    """The model card's front matter is missing or invalid."""


def _dataset(report: dict) -> tuple[Optional[str], str]:
    spec = str(report.get("dataset") or "")
    if spec in _DATASETS:
        return _DATASETS[spec]
    if spec.startswith("hf:"):
        name = spec[3:].split(":")[0]
        return name, name
    return None, (Path(spec).name if spec else "evaluation data")


def _acc(ev: Optional[dict]) -> Optional[float]:
    if isinstance(ev, dict) and isinstance(ev.get("top1"), (int, float)):
        return round(float(ev["top1"]), 2)
    return None


def _num(v: Any, scale: float, unit: str, digits: int = 2) -> str:
    return f"{v / scale:.{digits}f}{unit}" if isinstance(v, (int, float)) and v else "–"


def _latency(report: dict, role: str) -> str:
    lat = report.get("latency")
    if not isinstance(lat, dict):
        return "not measured"
    v = lat.get(role)
    if isinstance(v, dict):
        for key in ("ms", "median_ms", "mean_ms", "latency_ms", "p50_ms"):
            if isinstance(v.get(key), (int, float)):
                v = v[key]
                break
    return f"{v:.2f} ms" if isinstance(v, (int, float)) else "not measured"


def _latency_note(report: dict) -> str:
    lat = report.get("latency")
    if not isinstance(lat, dict):
        return "Latency: not measured for this checkpoint."
    setup = {k: v for k, v in lat.items() if k not in ("teacher", "student") and not isinstance(v, dict)}
    return "Latency setup: " + ", ".join(f"{k} {v}" for k, v in setup.items()) if setup else ""


KIND_NAMES = {   # kind -> (name in prose, paper, what every converted attention computes)
    "linear_angular": ("Castling-ViT linear-angular attention", "[arXiv 2211.10526](https://arxiv.org/abs/2211.10526)",
                       "`proj(γ·normalize(½V + (1/π)·Q̂(K̂ᵀV)) + DW(V))`: no softmax and no N×N attention matrix"),
    "separable": ("MobileViTv2 separable self-attention", "[arXiv 2206.02680](https://arxiv.org/abs/2206.02680)",
                  "`proj(c ⊙ (a + b⊙ReLU(V)) + DW(V))` with one context vector `c = Σ_j softmax_j(⟨u, k_j⟩)·v_j` "
                  "per head: a softmax over N scores, no N×N attention matrix"),
}


def _kind(config: dict) -> tuple[str, str, str]:
    castling = config.get("castling") or {}
    kind = castling.get("kind", "linear_angular")
    if kind == "local_global":
        b, r, g, t = (castling.get(k) for k in ("block", "halo", "pool", "topk"))
        window = f"its {b}×{b} block" + (f" widened by {r}" if r else "")
        exact = castling.get("exact_tokens") or 0
        return ("local-global softmax attention", "castle-convert's `local_global` kind",
                f"one exact softmax per patch query over {window}, the prefix tokens, the {t} tokens the CLS token "
                f"attends to most and {g}×{g} pooled regions" +
                (f" (plain softmax for images of up to {exact} tokens)" if exact else "") +
                ": no N×N attention matrix")
    return KIND_NAMES.get(kind, (f"{kind} attention", "", "a linear attention"))


def builtin_origin(name: str) -> str:
    """Where a built-in teacher's weights come from, as the card says it."""
    from castle_convert import zoo
    return zoo.BUILTINS.get(name, {}).get("origin") or f"castle-convert's built-in `{name}` teacher"


def epochs_text(epochs: float) -> str:
    """``1 epoch``, ``0.25 epochs``, ``30 epochs``: the exact count, the noun agreeing with it."""
    return f"{epochs:g} epoch" + ("" if epochs == 1 else "s")


def model_title(config: dict) -> str:
    src = config.get("source", {})
    name = src.get("builtin") or src.get("base_model") or src.get("architecture") or \
        (src.get("architectures") or ["model"])[0]
    return f"{name.split('/')[-1]} with {_kind(config)[0]}"


def front_matter(config: dict, report: dict, model_name: str) -> "Any":
    from huggingface_hub import EvalResult, ModelCardData

    src = config.get("source", {})
    headless = bool(config.get("castle_headless"))
    ds_id, ds_name = _dataset(report)
    split = _SPLITS.get(str(report.get("dataset")), "validation")
    tags = ["castling-vit", "linear-attention", "vision-transformer", "castle-convert", "custom_code",
            "image-feature-extraction" if headless else "image-classification"]
    if src.get("library") == "timm":
        tags.append("timm")
    results = []
    cosine = (report.get("student") or {}).get("cosine")
    rows = [r for r in ((report.get("fidelity") or {}).get("rows") or []) if isinstance(r, dict)]
    if headless and rows:           # the headline: fidelity where the model is deployed, per resolution
        where = "held-out natural photos" if (report.get("fidelity") or {}).get("data") == "natural" else ds_name
        for r in rows:
            for key, what in (("patch_cosine", "patch-token"), ("cls_cosine", "CLS")):
                if isinstance(r.get(key), (int, float)):
                    results.append(EvalResult(
                        task_type="image-feature-extraction", dataset_type=ds_id or where, dataset_name=where,
                        dataset_split="held-out", metric_type="cosine_similarity", metric_value=round(float(r[key]), 4),
                        metric_name=f"{what} cosine to the teacher at {r['resolution']} px"))
    elif headless and isinstance(cosine, (int, float)):
        size = (report.get("macs") or {}).get("input_size")
        at = f" at {size[1]} px" if isinstance(size, list) and len(size) == 3 else ""
        results.append(EvalResult(task_type="image-feature-extraction", dataset_type=ds_id or ds_name,
                                  dataset_name=ds_name, dataset_split=split, metric_type="cosine_similarity",
                                  metric_value=round(float(cosine), 4),
                                  metric_name=f"Cosine similarity to the teacher's features{at}"))
    if not headless:
        for role, label in (("student", f"Top-1 accuracy (this model, {_kind(config)[0]})"),
                            ("teacher", "Top-1 accuracy (teacher: the original softmax-attention model)")):
            value = _acc(report.get(role))
            if value is not None:
                results.append(EvalResult(task_type="image-classification", dataset_type=ds_id or ds_name,
                                          dataset_name=ds_name, dataset_split=split,
                                          metric_type="accuracy", metric_value=value, metric_name=label))
    # timm sources load with timm.create_model("hf-hub:REPO") (transformers remote code stays a documented route)
    kwargs = dict(library_name="timm" if src.get("library") == "timm" else "transformers",
                  pipeline_tag="image-feature-extraction" if headless else "image-classification",
                  tags=tags, metrics=(["cosine_similarity"] if headless else ["accuracy"]) if results else None,
                  datasets=[ds_id] if ds_id else None)
    if src.get("base_model"):
        kwargs.update(base_model=src["base_model"], base_model_relation="finetune")
    if src.get("license"):
        kwargs["license"] = src["license"]
    if results:
        kwargs.update(model_name=model_name, eval_results=results)
    return ModelCardData(**{k: v for k, v in kwargs.items() if v is not None})


def _usage(config: dict, repo: str) -> str:
    src = config.get("source", {})
    headless = bool(config.get("castle_headless"))
    auto = "AutoModel" if headless else "AutoModelForImageClassification"
    out_line = ("features = model(**inputs).last_hidden_state      # (1, tokens, dim); pooled: .pooler_output"
                if headless else "print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])")
    family = "Eva" if config.get("timm_eva") else "NaFlexVit" if config.get("timm_naflex") else None
    imports = (f"they import torch and transformers, and build this timm {family} architecture with timm: `pip "
               "install timm`" if family else "they import only torch and transformers")
    parts = [f"""### transformers (no castle-convert needed)

```python
from PIL import Image
from transformers import AutoImageProcessor, {auto}

processor = AutoImageProcessor.from_pretrained("{repo}")
model = {auto}.from_pretrained("{repo}", trust_remote_code=True).eval()
inputs = processor(images=Image.open("image.png"), return_tensors="pt")
{out_line}
```

`trust_remote_code=True` runs `modeling_castling.py`, `modeling_castling_timm.py`, `castling_layers.py`,
`configuration_castling.py`, `castling_functional.py` and `castling_checks.py` from this repository ({imports}); read
them first."""]
    if not headless:
        parts.append(f"""```python
from transformers import pipeline

classify = pipeline("image-classification", model="{repo}", trust_remote_code=True)
print(classify("image.png"))
```""")
    on_hub = "/" in repo and not repo.startswith("path/")
    load_code = (f'from huggingface_hub import snapshot_download\n\nmodel = cc.load(snapshot_download("{repo}"))'
                 if on_hub else f'model = cc.load("{repo}")')
    parts.append(f"""### castle-convert

```python
import castle_convert as cc
{load_code}
```

`cc.load` rebuilds the {src.get("library", "source")} architecture, converts it and loads the weights
(safetensors only); the preprocessing stays attached: timm's `model.pretrained_cfg`, or for transformers
sources `model.castle_image_processor`, the `preprocessor_config.json` dict
(`AutoImageProcessor.from_pretrained` of the directory builds the processor itself).""")
    arch = config.get("architecture") or (f"castle_{src.get('architecture')}" if src.get("library") == "timm" else None)
    if arch and arch != "castle_transformers":       # timm sources, and transformers ones with a timm equivalent
        file = f'hf_hub_download("{repo}", "model.safetensors")' if on_hub else f'"{repo}/model.safetensors"'
        other = f'"hf-hub:{repo}"' if on_hub else f'"local-dir:{repo}"'
        parts.append(f"""### timm

```python
import timm, castle_convert  # importing castle_convert registers the castle_* architectures
{"from huggingface_hub import hf_hub_download" + chr(10) if on_hub else ""}
model = timm.create_model("{arch}", pretrained=True,
                          pretrained_cfg_overlay=dict(file={file}))
model = timm.create_model({other}, pretrained=True)  # the same, configured from config.json
```""")
    parts.append(_fine_tuning(config, repo, auto))
    return "\n\n".join(parts)


def _fine_tuning(config: dict, repo: str, auto: str) -> str:
    """A head on a backbone, and LoRA: which module names to target (the source's q/k/v are one fused Linear)."""
    separable = (config.get("castling") or {}).get("kind") == "separable"
    fused, what = ("in_proj", "values and context scores") if separable else ("qkv", "query, key and value")
    src = config.get("source", {})
    names = ('`q_proj` / `k_proj` / `v_proj`' if src.get("library") == "transformers" else "`q` / `k` / `v`")
    head = (f"""```python
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True, num_labels=10)
# a new classification head (10 classes) on this backbone; train it as any transformers classifier
```

""" if bool(config.get("castle_headless")) and "AutoModelForImageClassification" in (config.get("auto_map") or {})
            else "")
    return f"""### Fine-tuning

{head}Every converted attention has one fused projection, `{fused}` ({what}), and an output projection `proj`, in
place of the source's separate {names} (`query` / `key` / `value` in older transformers): PEFT finds none of those
names here. Target the fused ones:

```python
from peft import LoraConfig, get_peft_model

model = get_peft_model({auto}.from_pretrained("{repo}", trust_remote_code=True),
                       LoraConfig(r=8, target_modules=["{fused}", "proj"]))
```

(`print(model)` shows the same hint on every converted attention; with castle-convert installed,
`castle_convert.lora_targets(model, ["query", "value"])` maps the source's names.)"""


def _preprocessing(processor: Optional[dict], config: dict, repo: str = "path/to/this/directory") -> str:
    from castle_convert import zoo
    if not processor:
        return "No preprocessor_config.json."
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    resize = processor.get("size", {})
    how = (f"resize the shorter side to {resize.get('shortest_edge')} px, centre-crop {size.get('height')}×"
           f"{size.get('width')}" if processor.get("do_center_crop") and isinstance(size, dict)
           else f"resize to {resize.get('height')}×{resize.get('width')}" if isinstance(resize, dict) else "resize")
    mean = ", ".join(f"{v:g}" for v in processor.get("image_mean", []))
    std = ", ".join(f"{v:g}" for v in processor.get("image_std", []))
    # only when it is known (a built-in teacher trained on greyscale images), never guessed from equal means
    grey = bool(zoo.BUILTINS.get(config.get("source", {}).get("builtin"), {}).get("greyscale"))
    text = (f"`preprocessor_config.json` ({processor.get('image_processor_type')}): {how}, scale to [0, 1], "
            f"normalise with mean ({mean}) and std ({std}); images are converted to RGB first "
            f"(`do_convert_rgb`).")
    if grey:
        text += (" The teacher was trained on greyscale images repeated over 3 channels (equal per-channel "
                 "mean/std): feed greyscale images (a PIL `L` image is converted to RGB by the processor).")
    out = (size or {}).get("height") if isinstance(size, dict) else None
    if out:
        text += f" It produces {out}×{size.get('width', out)} px images: the size this model is published for"
        if config.get("distilled_resolution") and config["distilled_resolution"] != out:
            text += f" (it was distilled at {config['distilled_resolution']} px, where distilling is cheap)"
        text += "."
    elif config.get("distilled_resolution"):
        text += f" The model was distilled at {config['distilled_resolution']} px."
    return text + "\n\n" + _change_size(processor, config, repo)


def _change_size(processor: dict, config: dict, repo: str) -> str:
    """How to run the model at another input size (the fidelity table shows what each size keeps)."""
    src = config.get("source", {})
    crop = processor.get("do_center_crop") and isinstance(processor.get("size"), dict) and \
        "shortest_edge" in processor["size"]
    if crop:
        ratio = processor["size"]["shortest_edge"] / max(1, (processor.get("crop_size") or {}).get("height", 1))
        kwargs = f'size={{"shortest_edge": {int(round(448 * ratio))}}}, crop_size={{"height": 448, "width": 448}}'
    else:
        kwargs = 'size={"height": 448, "width": 448}'
    any_size = src.get("library") == "timm" or str(src.get("model_type", "")).startswith(("dinov2", "dinov3", "siglip2"))
    lines = ["**Another input size** (a multiple of the patch size; linear attention saves most at high resolution, "
             "and the fidelity table above shows what each size keeps):", "", "```python",
             f'processor = AutoImageProcessor.from_pretrained("{repo}", {kwargs})']
    on_hub = "/" in repo and not repo.startswith("path/")
    if src.get("library") == "timm":
        lines += [f'model = timm.create_model("{"hf-hub" if on_hub else "local-dir"}:{repo}", pretrained=True, '
                  'img_size=448)',
                  "# timm: data_config = timm.data.resolve_data_config(model=model) follows img_size"]
    elif not any_size:
        lines += ["outputs = model(**processor(images=image, return_tensors=\"pt\"), interpolate_pos_encoding=True)"]
    lines += ["```"]
    if src.get("library") != "timm" and not any_size:
        lines += ["", "This architecture resizes its position embedding only with `interpolate_pos_encoding=True`, "
                      "which `pipeline()` does not pass: call the model directly at other sizes."]
    return "\n".join(lines)


PICTURES = {"fidelity.png": "Fidelity to the teacher and latency against input resolution",
            "stage1.png": "Stage 1: each converted layer's error against its softmax layer, before and after"}


def render_card(config: dict, report: Optional[dict] = None, recipe_yaml: Optional[str] = None, *,
                repo_id: Optional[str] = None, processor: Optional[dict] = None,
                pictures: tuple[str, ...] = ()) -> str:
    """README.md text for a directory whose config.json / report.json / recipe.yaml are given; ``pictures``: the
    PNGs of :data:`PICTURES` the directory holds (shown where they belong)."""
    report = report or {}
    src = config.get("source", {})
    repo = repo_id or "path/to/this/directory"
    title = model_title(config)
    data = front_matter(config, report, repo_id.split("/")[-1] if repo_id else title)
    headless = bool(config.get("castle_headless"))
    castling = config.get("castling", {})
    _, ds_name = _dataset(report)
    origin = (f"the Hub model [`{src['base_model']}`](https://huggingface.co/{src['base_model']})"
              if src.get("base_model") else builtin_origin(src["builtin"])
              if src.get("builtin") else f"`{src.get('model') or src.get('architecture') or title}`")
    kept = list((report or {}).get("keep_softmax") or [])
    lines = [f"# {title}", "", MARKER, "",
             f"This {'backbone' if headless else 'image classifier'} is {origin}, converted with "
             f"castle-convert to {_kind(config)[0]}" + (f" ({_kind(config)[1]})" if _kind(config)[1] else "") +
             " and distilled against the original "
             "model (the teacher). " + (
                 "Every softmax self-attention " if not kept else "A hybrid: ") +
             f"{'(' if not kept else ''}{len(config.get('converted_modules') or [])} modules"
             f"{')' if not kept else ' of its self-attentions'} now compute{'s' if not kept else ''} "
             f"{_kind(config)[2]}, so {'its' if not kept else 'their'} cost grows linearly with the number of tokens"
             + (f"; {len(kept)} stay softmax attention (`keep_softmax`: {', '.join(f'`{k}`' for k in kept)})"
                if kept else "") + ".", ""]
    lines += ["## Results", ""]
    t, s = report.get("teacher"), report.get("student")
    params, macs = report.get("params", {}), report.get("macs", {})
    metric = "top-1" if not headless else "cosine to teacher"

    def score(ev):
        if not isinstance(ev, dict):
            return "–"
        if "top1" in ev:
            return f"{ev['top1']:.2f}%"
        if "agree" in ev:
            return f"{ev['agree']:.1f}% agreement"
        return f"{ev['cosine']:.4f}" if "cosine" in ev else "–"

    lines += _fidelity_section(report)
    if "fidelity.png" in pictures:
        lines += [f"![{PICTURES['fidelity.png']}](fidelity.png)", ""]
    if report:
        size = macs.get("input_size")
        if (report.get("fidelity") or {}).get("rows") and size:
            lines += [f"During distillation, on the run's validation images at {size[1]} px:", ""]
        lines += [f"| model | {metric} | params | MACs | latency |", "|---|---|---|---|---|",
                  f"| teacher (softmax attention) | {score(t)} | {_num(params.get('teacher'), 1e6, 'M')} | "
                  f"{_num(macs.get('teacher'), 1e6, 'M', 1)} | {_latency(report, 'teacher')} |",
                  f"| **this model** ({castling.get('kind', 'linear_angular').replace('_', '-')}) | {score(s)} | {_num(params.get('student'), 1e6, 'M')} | "
                  f"{_num(macs.get('student'), 1e6, 'M', 1)} | {_latency(report, 'student')} |", ""]
        size = macs.get("input_size")
        notes = [f"Evaluated on {ds_name} ({(t or {}).get('n', '?')} images)"
                 + (f"; MACs at {size[1]}×{size[2]} px ({macs.get('tokens')} tokens)" if size else "") + "."]
        if _acc(t) is not None and _acc(s) is not None:
            notes.append(f"Δ top-1 vs teacher: {s['top1'] - t['top1']:+.2f} points; agreement with the teacher's "
                         f"predictions {s.get('agree', float('nan')):.2f}%.")
        note = _latency_note(report)
        if note:
            notes.append(note)
        lines += [" ".join(notes), ""]
    else:
        lines += ["No report.json: accuracy, MACs and latency were not measured for this checkpoint.", ""]
    lines += ["## Usage", "", _usage(config, repo), "", "## Preprocessing", "", _preprocessing(processor, config, repo),
              ""]
    lines += ["## Conversion", "",
              f"* source: {src.get('library')} `{src.get('architecture') or (src.get('architectures') or ['?'])[0]}`"
              + (f" (built-in `{src['builtin']}`)" if src.get("builtin") else ""),
              "* castling: " + ", ".join(f"{k}={v}" for k, v in castling.items() if k in (
                  "kind", "combine", "dw", "dw_kernel", "eps")),
              "* files: `model.safetensors` (inference-only weights), `config.json`, `preprocessor_config.json`, "
              "`configuration_castling.py` / `modeling_castling.py` / `modeling_castling_timm.py` / `castling_layers.py` / "
              "`castling_functional.py` / `castling_checks.py` (remote code), "
              "`recipe.yaml`, `report.json`", ""]
    if "stage1.png" in pictures:
        lines += [f"![{PICTURES['stage1.png']}](stage1.png)", ""]
    if recipe_yaml:
        lines += ["## Training recipe", "",
                  f"Distilled with the `{report.get('recipe', 'custom')}` recipe"
                  + (f" for {epochs_text(report['epochs'])} ({report.get('steps')} steps, "
                     f"{report.get('train_time_s', 0):.0f} s)" if isinstance(report.get("epochs"), (int, float))
                     else "") + ":", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    lines += ["## Limitations", "",
              "* The attention is an approximation of the teacher's softmax attention: expect accuracy close "
              "to, not equal to, the teacher's (see Results).",
              "* Linear attention has no attention matrix: attention masks / head masks are not supported "
              "(vision models do not use them), and `output_attentions=True` raises an error (there are no "
              "attention weights to return; `output_hidden_states=True` works).",
              "* Loading with transformers needs `trust_remote_code=True`"
              + (" and timm installed (`pip install timm`): the remote code builds the timm "
                 + ("Eva" if config.get("timm_eva") else "NaFlexVit") + " architecture."
                 if config.get("timm_eva") or config.get("timm_naflex") else ".")]
    versions = report.get("versions")
    if versions:
        lines += ["", "Written with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    from huggingface_hub import ModelCard
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def _fidelity_section(report: Optional[dict]) -> list[str]:
    """The fidelity block (castle_convert/fidelity.py) as a table: where the user deploys, first."""
    block = (report or {}).get("fidelity") or {}
    rows = block.get("rows") or []
    if not rows:
        return []

    def f(v, spec):
        return "–" if v is None else format(v, spec)
    where = ("held-out natural photos (castle-convert's built-in set, never seen in distillation)"
             if block.get("data") == "natural" else f"held-out images of {block.get('data')}")
    out = [f"Fidelity to the teacher on {where}, per input resolution:", "",
           "| resolution | images | patch-token cosine | CLS cosine | agreement | MACs ratio | latency ratio |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['resolution']} px | {r['images']} | {f(r.get('patch_cosine'), '.4f')} | "
                   f"{f(r.get('cls_cosine'), '.4f')} | {f(r.get('agree'), '.1f')} | {f(r.get('macs_ratio'), '.3f')} | "
                   f"{f(r.get('latency_ratio'), '.3f')} |")
    out += ["", f"Ratios are this model / the teacher (batch 1, {block.get('device', 'cpu')}, "
                f"{block.get('threads', '?')} threads); cosines are means over images and tokens.", ""]
    return out


def render_card_for_dir(path: Path, repo_id: Optional[str] = None) -> str:
    """Render the card of an output directory from its own files."""
    from castle_convert.export.load import MAX_JSON_BYTES, read_json_file
    path = Path(path)
    config = read_json_file(path / "config.json")
    report = read_json_file(path / "report.json") if (path / "report.json").is_file() else None
    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file() and recipe_file.stat().st_size > MAX_JSON_BYTES:
        raise CardError(f"{recipe_file} is {recipe_file.stat().st_size} bytes: not a recipe castle-convert wrote")
    recipe = recipe_file.read_text(errors="replace") if recipe_file.is_file() else None
    proc_file = path / "preprocessor_config.json"
    processor = read_json_file(proc_file) if proc_file.is_file() else None
    try:
        return render_card(config, report, recipe, repo_id=repo_id, processor=processor,
                           pictures=tuple(n for n in PICTURES if (path / n).is_file()))
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
        raise CardError(f"the model card of {path} cannot be rendered from its files ({type(e).__name__}: "
                        f"{str(e)[:120]}): report.json or config.json holds values castle-convert did not write; "
                        "write the directory again with cc.save_pretrained") from None


def validate_card(text: str, where: str = "README.md", *, require_results: bool = True) -> "Any":
    """Parse the front matter (huggingface_hub ModelCard, offline) and check what the Hub needs.

    ``require_results``: the model-index must hold evaluation results (true when a report exists)."""
    from huggingface_hub import ModelCard

    if not text.startswith("---"):
        raise CardError(f"{where} has no YAML front matter (it must start with ---)")
    try:
        card = ModelCard(text)
    except Exception as e:  # noqa: BLE001 - yaml / metadata errors of several types
        raise CardError(f"{where}: invalid front matter ({type(e).__name__}: {e})") from e
    data = card.data.to_dict()
    missing = [k for k in REQUIRED_KEYS if not data.get(k) and not (k == "model-index" and (
        card.data.eval_results or not require_results))]
    if missing:
        raise CardError(f"{where}: front matter lacks {', '.join(missing)}")
    tags = data.get("tags") or []
    absent = [t for t in REQUIRED_TAGS if t not in tags]
    if absent:
        raise CardError(f"{where}: tags lack {', '.join(absent)}")
    if data.get("base_model_relation") and not data.get("base_model"):
        raise CardError(f"{where}: base_model_relation without base_model")
    return card
