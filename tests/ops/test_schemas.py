"""flatfused/op_schemas.def is the one statement of every op's arguments: the C++ library
registers exactly it, every backend's kernel takes exactly its argument names, and the keyword
form of a kernel binds calls by it (defaults filled in, mistakes refused)."""
import inspect

import pytest
import torch

import flatfused
from flatfused import _extension, _torch_ops, backends, ops, schemas


def test_comments_and_line_breaks_do_not_change_what_is_read(tmp_path):
    """The file is C++ too: a trailing comment or a schema split over lines reads the same."""
    path = tmp_path / "schemas.def"
    path.write_text('// header\nFLATFUSED_OP("zero_(Tensor(a!) grad) -> ()")  // the reset\n'
                    'FLATFUSED_OP(\n    "restore_(Tensor(a!) w, Tensor w0, "\n'
                    '    "Tensor(b!)? grad, Tensor? src, float scale) -> ()")\n')
    assert schemas.read(path) == [
        "zero_(Tensor(a!) grad) -> ()",
        "restore_(Tensor(a!) w, Tensor w0, Tensor(b!)? grad, Tensor? src, float scale) -> ()"]


def test_the_file_holds_every_op_once():
    texts = schemas.read()
    names = [t.split("(", 1)[0] for t in texts]
    assert len(names) == len(set(names)) >= 11
    assert list(schemas.all_schemas()) == names


@pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="the C++ extension is not built")
def test_the_library_registers_exactly_the_file():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("flatfused::")}
    assert registered == set(schemas.all_schemas())
    for name, op in schemas.all_schemas().items():
        got = getattr(torch.ops.flatfused, name).default._schema
        assert str(got) == str(torch._C.parse_schema(f"flatfused::{op.text}"))


def _backend_modules():
    out = [("torch", _torch_ops)]
    if backends.triton_error() is None:
        from flatfused import triton_kernels
        out.append(("triton", triton_kernels))
    return out


@pytest.mark.parametrize("backend,module", _backend_modules(), ids=lambda x: getattr(x, "__name__", x))
def test_python_kernels_take_the_schema_names(backend, module):
    """One name per argument across layers: a keyword call means the same in every backend."""
    for name, op in schemas.all_schemas().items():
        params = tuple(inspect.signature(getattr(module, name)).parameters)
        assert params == op.names, (backend, name)


def test_written_operands_come_from_the_alias_annotations():
    s = schemas.all_schemas()
    assert s["restore_"].written == {"w", "grad"}
    assert s["grad_norm_sq_"].written == {"out"}
    assert s["sam_ascent_"].written == {"w", "w0", "grad", "g0"}
    assert "w0" not in s["sgd_step_"].written and "momentum_buffer" in s["sgd_step_"].written
    assert set(s["adam_step_"].tensors) == {"w", "w0", "grad", "src", "exp_avg", "exp_avg_sq"}


def test_disjointness_follows_the_schema():
    """grad_norm_sq_ reads grad and w (not written): the two may be one tensor; out is
    written: it may not share memory with grad."""
    grad = torch.arange(8.0)
    out = torch.zeros(1)
    ops.grad_norm_sq_(out, grad, w=grad, backend="torch")
    assert out.item() == float((grad * grad).square().sum())
    with pytest.raises(ValueError, match="out and grad must not share memory"):
        ops.grad_norm_sq_(grad[:1], grad, backend="torch")


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu")
                                     if b in backends.available(torch.device("cpu"))])
def test_keyword_and_positional_calls_agree(backend):
    n = 37
    g = torch.Generator().manual_seed(0)
    w, grad, buf = (torch.randn(n, generator=g) for _ in range(3))
    hyper = dict(scale=0.5, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3,
                 nesterov=True, maximize=False, first_step=False, write_grad=False)
    a = [t.clone() for t in (w, grad, buf)]
    b = [t.clone() for t in (w, grad, buf)]
    kernel = ops.kernel("sgd_step_", backend)
    kernel(a[0], None, a[1], None, a[2], *hyper.values(), 0.0, 0.0)
    kernel(w=b[0], w0=None, grad=b[1], src=None, momentum_buffer=b[2], **hyper)  # defaults
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_keyword_mistakes_are_clear_errors():
    zero = ops.kernel("zero_", "torch")
    with pytest.raises(TypeError, match="has no argument 'gard'"):
        zero(gard=torch.zeros(2))
    with pytest.raises(TypeError, match="needs 'grad'"):
        zero()
    restore = ops.kernel("restore_", "torch")
    with pytest.raises(TypeError, match="got 'w' twice"):
        restore(torch.zeros(2), torch.zeros(2), None, None, w=torch.zeros(2))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        restore(*([None] * 6))
    with pytest.raises(ValueError, match="no flatfused op named 'nope_'"):
        schemas.schema("nope_")


def test_keyword_forms_are_built_once_per_kernel():
    """A backend whose ops are methods hands out a new bound method at each lookup: its keyword
    form is still built once, and forgotten with the backend."""
    class Ops:
        def zero_(self, grad):
            grad.zero_()

    backends.register_backend("test-keywords", Ops(), lambda device: None)
    try:
        first = ops.kernel("zero_", "test-keywords")
        for _ in range(50):
            assert ops.kernel("zero_", "test-keywords") is first
            first(grad=torch.ones(3))
        assert [k for k in backends._keyword_calls if k[0] == "test-keywords"] == [
            ("test-keywords", "zero_")]
    finally:
        backends.unregister_backend("test-keywords")
    assert not [k for k in backends._keyword_calls if k[0] == "test-keywords"]


def test_optimizers_step_through_keyword_calls():
    """The optimizers call every kernel by keyword: a step runs (a renamed argument would fail
    here with the schema in the message)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for make in (lambda: flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=1e-2, seed=0),
                 lambda: flatfused.SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)):
        assert torch.isfinite(make().step(closure))
