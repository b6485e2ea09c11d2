"""The README as a front page: its Python blocks run as pasted, it stays short, its test command
is the one CI runs, and every relative link of the README and of docs/*.md resolves.

The examples moved from the README into docs/usage.md and docs/training.md use a `model`,
`loader` and `loss_fn` of the reader's own; they run here on a small model and loader
(`namespace()`), as they did in the README.
"""
import re
from pathlib import Path

import pytest
import torch

from cases import docs_namespace as namespace
from cases import python_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200


def _run(code, name, ns):
    exec(compile(code, name, "exec"), ns)
    return ns


def _trained(ns, before):
    after = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the weights did not move"


# ---------------------------------------------------------------------------------------------
# The README's blocks, as pasted


README_BLOCKS = python_blocks()


def test_readme_has_an_example_per_optimizer_and_one_for_sharpness():
    text = "\n".join(README_BLOCKS)
    assert len(README_BLOCKS) >= 5, "README lost its usage examples"
    for needle in ("flatfused.NSO(", "store_gradients(", "flatfused.SAM(", "flatfused.WeightedSAM(",
                   "flatfused.sharpness"):
        assert needle in text, needle


@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_block_runs_as_pasted(index, tmp_path, monkeypatch):
    """Each block runs, and one that trains a model moves its weights to finite values: the
    weights are recorded when the first optimizer over them is built."""
    monkeypatch.chdir(tmp_path)  # a block may write files (the tracker's CSV and plot)
    at_start = {}
    build = torch.optim.Optimizer.__init__

    def recording(self, params, defaults):
        params = list(params)
        build(self, params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                at_start.setdefault(id(p), p.detach().clone())

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", recording)
    torch.manual_seed(0)
    ns = _run(README_BLOCKS[index], f"README.md[python block {index}]", {"__name__": "__main__"})
    model = ns.get("model")
    if isinstance(model, torch.nn.Module) and "optimizer" in ns:
        params = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in params)
        assert any(not torch.equal(p, at_start[id(p)]) for p in params), "the weights did not move"


def test_readme_tracker_block_writes_its_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in README_BLOCKS if "SAMEdgeTracker" in b]
    ns = _run(block, "README.md[tracker block]", {"__name__": "__main__"})
    assert len(ns["tracker"]) >= 1
    assert (tmp_path / "edge.csv").exists() and (tmp_path / "edge.png").exists()


# ---------------------------------------------------------------------------------------------
# The README as a page


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    (marker,) = [i for i, line in enumerate(ci) if line.strip() == "# The README's test command."]
    command = ci[marker + 1].strip()
    bash = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert any(line.strip() == command or line.rstrip().endswith("&& " + command)
               for block in bash for line in block.splitlines()), command


def _markdown_files():
    return [README, *sorted(DOCS.glob("*.md"))]


def _relative_links(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # not in code
    text = re.sub(r"`[^`\n]*`", "", text)                                     # nor inline code
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor in the same page
        yield target


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(path):
    missing = [t for t in _relative_links(path)
               if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_link_checker_sees_links():
    links = list(_relative_links(README))
    assert "docs/usage.md" in links and "docs/benchmarks.md" in links


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_pages_speak_of_the_library(path):
    text = path.read_text()
    for phrase in ("other agents", "the issue's", "task had no GPU", "no task so far", "DESIGN.md",
                   "REFERENCE_API.md", "this session", "the seed's"):
        assert phrase not in text, f"{path.relative_to(ROOT)}: {phrase!r}"
    lent = re.search(r"\blent\b", text)  # "a lent machine": how it was made, not the library
    assert lent is None, f"{path.relative_to(ROOT)}: {text[lent.start() - 40:lent.end() + 40]!r}"


# ---------------------------------------------------------------------------------------------
# The examples moved into docs/, on a small model and loader


def test_usage_page_examples_run_and_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS / "usage.md")
    assert len(blocks) >= 4
    for index, code in enumerate(blocks):
        ns = namespace()
        before = [p.detach().clone() for p in ns["model"].parameters()]
        _run(code, f"docs/usage.md[python block {index}]", ns)
        _trained(ns, before)


def test_training_page_mixed_precision_example_runs_on_the_cpu():
    (code,) = [b for b in python_blocks(DOCS / "training.md") if "GradScaler" in b]
    ns = namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    _run(code.replace('"cuda"', '"cpu"'), "docs/training.md[mixed precision block]", ns)
    _trained(ns, before)


def test_training_page_torch_compile_example_trains_the_compiled_model():
    (code,) = [b for b in python_blocks(DOCS / "training.md") if "torch.compile(model)" in b]
    ns = namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    torch._dynamo.reset()
    _run(code, "docs/training.md[torch.compile block]", ns)
    assert ns["compiled"]._orig_mod is ns["model"]
    _trained(ns, before)
