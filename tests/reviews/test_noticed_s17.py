"""Session 17: items from the "noticed and left alone" list that are now fixed."""

from __future__ import annotations

import pytest

from layerfast.errors import LayerfastError
from layerfast.interp import interp_options


def test_sigma_beyond_float32_is_refused() -> None:
    """`--sigma 1e39` is finite in float64 but Inf in the weights' float32: every noisy weight
    became Inf, and the run went on with only the overflow warning."""
    with pytest.raises(LayerfastError, match="beyond float32's range"):
        interp_options(["interp"], "0.5", "0,1e39")
    assert interp_options(["interp"], "0.5", "3e37") == ([0.5], [3e37])  # s22: σ·8.6 must fit


def test_distance_figure_spanning_beyond_float64_ratios_draws(tmp_path) -> None:
    """Distances from 1e-300 to 1e250 made the log colour scale's hi / lo overflow to inf, and
    `layerfast report` died in matplotlib's tick code (OverflowError, exit 1)."""
    from layerfast.report.figures import distance_figure
    from layerfast.report.tables import read_distances

    rows = ["unit,checkpoint,l2,l2_rel,linf"]
    for u, rel in (("a", 1e-300), ("b", 1e250), ("c", 0.5)):
        rows += [f"{u},0,0,0,0", f"{u},1,{rel},{rel},{rel}"]
    (tmp_path / "distances.csv").write_text("\n".join(rows) + "\n")
    fig = distance_figure(read_distances(tmp_path / "distances.csv"))
    fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


@pytest.mark.parametrize("loss", ["-inf", "-0.5"])
def test_results_reader_refuses_a_negative_loss(loss: str, tmp_path) -> None:
    """A mean cross-entropy is never negative; a hand-edited -inf was read as a number."""
    from layerfast.report.tables import COLUMNS, read_results

    head = ",".join(COLUMNS)
    base = "*,baseline,,,0.1,0.05,0.2,,0.3,1,10,0,"
    row = f"fc1,reinit,0,,0.1,0.05,0.2,,{loss},1,10,0,robust"
    (tmp_path / "results.csv").write_text(f"{head}\n{base}\n{row}\n")
    with pytest.raises(LayerfastError, match="loss"):
        read_results(tmp_path / "results.csv")
    (tmp_path / "results.csv").write_text(f"{head}\n{base}\n{row.replace(loss, 'inf')}\n")
    assert read_results(tmp_path / "results.csv")["loss"].iloc[1] == float("inf")


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_swap_refuses_strided_views_that_share_an_element(device) -> None:
    """at::get_overlap_status answers "too hard" for non-dense views, and swap_ swapped two
    strided views of one storage that share elements, corrupting both (the op promises an
    error). Interleaved views that share no element still swap."""
    import torch

    from layerfast import ops

    b = torch.arange(20.0, device=device).view(4, 5)
    with pytest.raises(RuntimeError, match=r"a\[0\] and b\[0\] share memory without being"):
        ops.swap_([b[:, ::2][:2]], [b[:, ::2][1:3]])
    assert torch.equal(b.cpu(), torch.arange(20.0).view(4, 5))  # nothing written
    a = torch.arange(10.0, device=device)
    ops.swap_([a[::2]], [a[1::2]])
    assert a.cpu().tolist() == [1.0, 0.0, 3.0, 2.0, 5.0, 4.0, 7.0, 6.0, 9.0, 8.0]
    c = torch.arange(24.0, device=device).view(4, 6)
    ops.swap_([c[:, :3][::2]], [c[:, 3:][1::2]])  # one storage, disjoint elements
    want = torch.arange(24.0).view(4, 6)
    want[0::2, :3], want[1::2, 3:] = want[1::2, 3:].clone(), want[0::2, :3].clone()
    assert torch.equal(c.cpu(), want)
    x = torch.arange(9.0, device=device).view(3, 3)
    with pytest.raises(RuntimeError, match="share memory without being the same view"):
        ops.swap_([x], [x.t()])


def test_fake_kernels_refuse_the_layouts_the_kernels_refuse() -> None:
    """The fakes accepted any strides, so torch.compile traced calls the real ops refused at run
    time; now both refuse them, with the same message."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from layerfast import ops

    x = torch.randn(2, 3, 4, 5).transpose(2, 3)
    scale, shift = torch.rand(3), torch.randn(3)
    with pytest.raises(RuntimeError, match="x must be contiguous or channels_last"):
        ops.affine_relu(x, scale, shift, None, True)
    xc = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(5, 2, 3).transpose(0, 1)
    labels = torch.zeros(5, dtype=torch.long)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fs, fh = mode.from_tensor(scale), mode.from_tensor(shift)
        with pytest.raises(RuntimeError, match="x must be contiguous or channels_last"):
            ops.affine_relu(fx, fs, fh, None, True)
        with pytest.raises(RuntimeError, match="residual must have x's memory layout"):
            ops.affine_relu(mode.from_tensor(xc), fs, fh, mode.from_tensor(torch.randn(2, 3, 4, 5)))
        out = ops.affine_relu(mode.from_tensor(xc), fs, fh, None, True)
        assert out.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="logits must be contiguous"):
            ops.score_(mode.from_tensor(logits), mode.from_tensor(labels),
                       mode.from_tensor(labels), mode.from_tensor(torch.zeros(2, 4).double()))


def test_convert_removes_what_a_killed_convert_left_and_locks_its_target(tmp_path, capsys):
    """A SIGKILLed convert left `.NAME.beton.<rand>.stage` and `.tmp` next to the target, as
    big as the data, and no later convert removed them. Now a convert locks its target, so it
    can delete them; a second convert of the same target meanwhile is refused."""
    from tests.data.test_data_ffcv import require_ffcv

    require_ffcv()
    from layerfast.cli import main
    from layerfast.data.beton import _lock_target, _unlock_target

    to = tmp_path / "d.beton"
    stale = [tmp_path / f".d.beton.k1ll3d_x.{s}" for s in ("stage", "tmp", "json.tmp")]
    other = [tmp_path / ".e.beton.k1ll3d_x.tmp", tmp_path / "keep.tmp"]
    for p in stale + other:
        p.write_bytes(b"x" * 100)
    assert main(["convert", "digits", "--to", str(to)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["d.beton", "d.beton.json", *(p.name for p in other)])
    capsys.readouterr()
    lock = _lock_target(to)  # another convert of d.beton in progress
    try:
        assert main(["convert", "digits", "--to", str(to)]) == 2
        err = capsys.readouterr().err.strip()
        assert "is writing to" in err and "--to" in err and len(err.splitlines()) == 1, err
    finally:
        _unlock_target(to, lock)
    assert not (tmp_path / ".d.beton.lock").exists()


def test_python_api_raises_layerfast_error_for_a_refused_path(tmp_path) -> None:
    """A name over NAME_MAX (or a directory the user may not search) made the first
    `Path.exists()` raise a bare OSError from `layerfast.analyze`, `train` and `convert`; the
    CLI said one line, the Python API did not raise its one type for bad input."""
    import layerfast
    from layerfast.data import convert, ffcv_available
    from layerfast.train import train

    long = tmp_path / ("x" * 300)
    too_long = "cannot access .*File name too long"
    # without FFCV, convert refuses before it looks at the path (a LayerfastError all the same)
    for call, why in ((lambda: layerfast.analyze("fcn3x256", long, progress=False), too_long),
                      (lambda: train("fcn3x256", "digits", 1, long, progress=False), too_long),
                      (lambda: convert("digits", f"{long}.beton"),
                       too_long if ffcv_available() else "needs FFCV")):
        with pytest.raises(LayerfastError, match=why):
            call()
    assert list(tmp_path.iterdir()) == []


def test_run_json_records_fanout_and_report_points_into_a_demo_dir(ckpts, tmp_path) -> None:
    """run.json recorded the fan-out's plan but not whether it was on (`--fanout auto` is on
    for CUDA only); `layerfast report DEMO_OUT` said "no results.csv" without pointing to the
    `analysis/` folder the demo writes its run into."""
    import json

    import layerfast
    from layerfast.report import summary

    out = tmp_path / "demo" / "analysis"
    kw = dict(data="digits", device="cpu", out=out, progress=False, reset="reinit",
              checkpoints=[0], max_samples=40, figures=False)
    layerfast.analyze("fcn3x256", ckpts, fanout="on", **kw)
    assert json.loads((out / "run.json").read_text())["fanout"] is True
    with pytest.raises(LayerfastError, match=r"writes its analysis to .*demo/analysis: layerfast "
                                             r"report .*demo/analysis"):
        summary(tmp_path / "demo")


def test_a_refused_resume_does_not_say_max_samples_twice(ckpts, tmp_path) -> None:
    import layerfast

    kw = dict(data="digits", device="cpu", out=tmp_path / "r", progress=False, reset="reinit",
              checkpoints=[0], figures=False)
    layerfast.analyze("fcn3x256", ckpts, max_samples=50, **kw)
    with pytest.raises(LayerfastError) as exc:
        layerfast.analyze("fcn3x256", ckpts, max_samples=40, **kw)
    assert "max_samples" in str(exc.value) and "another number of samples" not in str(exc.value)


def test_report_refuses_a_results_csv_with_a_header_only(tmp_path) -> None:
    """A header-only results.csv (a cut or emptied file) printed "no baseline row" and an
    empty table with exit 0."""
    from layerfast.report.tables import COLUMNS, read_results

    (tmp_path / "results.csv").write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(LayerfastError, match="a header but no rows"):
        read_results(tmp_path / "results.csv")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_index_without_a_gpu_is_named_as_given() -> None:
    """`--device cuda:7` without a GPU said "--device cuda was asked for"."""
    import torch

    from layerfast.engine.precision import resolve_device

    with pytest.raises(LayerfastError, match=r"--device cuda:7 was asked for"):
        resolve_device("cuda:7")
    with pytest.raises(LayerfastError, match=r"--device cuda was asked for"):
        resolve_device(torch.device("cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_swap_of_one_strided_view_with_itself_is_a_no_op(device) -> None:
    """The strided-overlap check (session 17) refused two objects of the same gapped view
    (`b[:, ::2]` twice), which the op documents as a no-op, and which it was before."""
    import torch

    from layerfast import ops

    b = torch.arange(24.0, device=device).reshape(4, 6)
    ops.swap_([b[:, ::2], b[1:, 1::3]], [b[:, ::2], b[1:, 1::3]])
    v = b[::2, 1:]
    ops.swap_([v], [v])
    assert torch.equal(b.cpu(), torch.arange(24.0).reshape(4, 6))


def test_a_lock_on_a_file_no_longer_at_the_path_does_not_count(tmp_path, monkeypatch) -> None:
    """train and convert unlink their lock file just before closing it. A run that had opened
    the old file took its lock afterwards and went on, beside a third run that had locked a
    new file at the path: two writers of one target."""
    import builtins

    from layerfast import store

    fh1 = store._acquire_lock(tmp_path)  # run 1 holds the lock
    stale = open(tmp_path / store.LOCKNAME, "a+")  # noqa: SIM115 - run 2 opened the file...
    (tmp_path / store.LOCKNAME).unlink()  # ...before run 1 unlinked it and closed
    fh1.close()
    fh3 = store._acquire_lock(tmp_path)  # run 3 locks a new file at the path
    real_open, calls = builtins.open, []

    def run2_open(path, *args, **kwargs):  # run 2's first open is the stale one
        calls.append(path)
        return stale if len(calls) == 1 else real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", run2_open)
    try:
        with pytest.raises(LayerfastError, match="another layerfast run .*is writing to"):
            store._acquire_lock(tmp_path)
    finally:
        monkeypatch.undo()
        fh3.close()
    assert len(calls) == 2 and stale.closed
