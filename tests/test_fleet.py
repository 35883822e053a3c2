"""Issuing copies per customer and naming the customer of a copy, on a tiny classifier (fast; the real models'
figures come from tools/fleet_bench.py and tests/test_fleet_models.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tinymodels import smooth_images, tiny_classifier

import onnxstain
from onnxstain import Preprocessing, StainOptions
from onnxstain._stain.many import Stainer
from onnxstain.cli import main
from onnxstain.errors import BadInputError
from onnxstain.fleet.identify import identify
from onnxstain.fleet.index import IndexEntry
from onnxstain.fleet.issue import check_customers, issue, read_customers
from onnxstain.fleet.registry import Registry
from onnxstain.math import identify as ident

PRE = Preprocessing(height=32, width=32, resize=None)
CUSTOMERS = ["acme", "globex", "initech"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    onnx.save(tiny_classifier(), d / "model.onnx")
    PRE.save(d / "model.preprocessing.json")
    return d


@pytest.fixture(scope="module")
def images():
    return smooth_images(96, seed=0)


def _seeds(start):
    return iter(range(start, start + 100))


def _issue(workdir, images, name, variant, customers=CUSTOMERS):
    dist = workdir / f"dist-{name}"
    dist.mkdir(exist_ok=True)
    with Registry.open(workdir / f"{name}.db", create=True) as reg:
        res = issue(workdir / "model.onnx", customers, dist, reg, images=images,
                    options=StainOptions(variant=variant, fpr=0.05), seeds=_seeds(10))
    return res, dist, workdir / f"{name}.db"


@pytest.fixture(scope="module")
def fleet(workdir, images):
    return _issue(workdir, images, "overwrite", "non-additive")


@pytest.fixture(scope="module")
def hidden_fleet(workdir, images):
    return _issue(workdir, images, "hidden", "additive")


def test_a_stainer_key_is_the_stain_of_that_seed(workdir, images):
    """Calibrating once changes nothing: a Stainer's copy is onnxstain.stain's, byte for byte."""
    opts = StainOptions(variant="additive", fpr=0.05)
    single = onnxstain.stain(workdir / "model.onnx", workdir / "s.onnx", workdir / "s.key", images=images,
                             options=StainOptions(variant="additive", fpr=0.05, seed=3))
    with Stainer(workdir / "model.onnx", opts, images=images) as st:
        other = st.stain(workdir / "m1.onnx", workdir / "m1.key", seed=9)
        again = st.stain(workdir / "m3.onnx", workdir / "m3.key", seed=3)
    assert again.model_sha256 == single.model_sha256 and other.model_sha256 != single.model_sha256
    # each copy carries its own key only: the shared job kept no edit of an earlier key
    assert onnxstain.verify(workdir / "m3.onnx", workdir / "s.key").stained
    assert not onnxstain.verify(workdir / "m3.onnx", workdir / "m1.key").stained
    assert not onnxstain.verify(workdir / "m1.onnx", workdir / "s.key").stained


def test_issue_writes_one_copy_per_customer_and_keys_only_to_the_registry(fleet):
    res, dist, db = fleet
    assert sorted(c.customer for c in res.issued) == sorted(CUSTOMERS) and res.skipped == []
    assert sorted(p.name for p in dist.iterdir()) == sorted(f"{c}.onnx" for c in CUSTOMERS)
    with Registry.open(db, readonly=True) as reg:
        recs = {r.customer: r for r in reg.copies()}
        assert set(recs) == set(CUSTOMERS) and {r.state for r in recs.values()} == {"issued"}
        for c in res.issued:
            key = onnxstain.Key.loaded(json.loads(reg.key_bytes(c.copy_id)))
            assert recs[c.customer].key_commitment == key.commitment
            assert onnxstain.verify(c.path, key).stained
        seeds = {onnxstain.Key.loaded(json.loads(reg.key_bytes(c.copy_id))).seed for c in res.issued}
    assert len(seeds) == len(CUSTOMERS)  # a seed per copy (fresh entropy unless a test gives them)
    assert not list(db.parent.glob(".onnxstain-tmp-*"))  # the staged keys are gone


def test_issue_resumes(workdir, images, fleet):
    _, dist, db = fleet
    with Registry.open(db) as reg:
        again = issue(workdir / "model.onnx", [*CUSTOMERS, "umbrella"], dist, reg, images=images,
                      options=StainOptions(variant="non-additive", fpr=0.05), seeds=_seeds(20))
        assert again.skipped == CUSTOMERS and [c.customer for c in again.issued] == ["umbrella"]
        assert len(reg.copies()) == 4


@pytest.mark.parametrize("which", range(len(CUSTOMERS)))
def test_identify_names_the_customer_from_the_weights(fleet, which):
    res, _, db = fleet
    copy = res.issued[which]
    with Registry.open(db, readonly=True) as reg:
        got = identify(copy.path, reg)
    assert got.basis == "white-box" and [m.customer for m in got.named] == [copy.customer]
    assert got.bound_log10 is not None and got.bound_log10 <= -6
    assert got.runner_up is not None and not got.runner_up.named


def test_identify_names_no_one_in_the_original(workdir, fleet):
    with Registry.open(fleet[2], readonly=True) as reg:
        assert identify(workdir / "model.onnx", reg).named == []
        assert identify(workdir / "model.onnx", reg, black_box=True).named == []


@pytest.mark.parametrize("chunk", [256, 2])
def test_identify_black_box(fleet, chunk, monkeypatch):
    """The keys' triggers are queried a chunk of keys at a time (2: the three keys in two batches) alike."""
    import sys

    # the module by its full name: the package exports a function called identify
    monkeypatch.setattr(sys.modules["onnxstain.fleet.identify"], "QUERY_CHUNK", chunk)
    res, _, db = fleet
    with Registry.open(db, readonly=True) as reg:
        got = identify(res.issued[1].path, reg, black_box=True)
        # one trigger per key, then verify on the passing key: its trigger, 3 controls, 16 natural photos
        assert got.basis == "black-box" and got.queries == len(reg.copies()) + 20
        # the customer's key passes and no other does; a tiny model's detectors (m = 27) leave the cross-key
        # bound near 1, so the black box does not name the customer, and says why (real models: test_fleet_models)
        assert got.best is not None and got.best.customer == res.issued[1].customer and got.best.passed
        assert got.runner_up is not None and not got.runner_up.passed
        assert got.named == [] and any("above the target" in n for n in got.notes)
        with pytest.raises(BadInputError, match="budget"):
            identify(res.issued[1].path, reg, black_box=True, query_budget=2)


def _average(paths, out):
    """Colluders average their copies' weights, tensor by tensor."""
    models = [onnx.load(p) for p in paths]
    merged = models[0]
    for i, t in enumerate(merged.graph.initializer):
        arrays = [onnx.numpy_helper.to_array(m.graph.initializer[i]) for m in models]
        if arrays[0].dtype.kind == "f":
            t.CopyFrom(onnx.numpy_helper.from_array(np.mean(arrays, axis=0).astype(arrays[0].dtype), t.name))
    onnx.save(merged, out)
    return out


@pytest.mark.parametrize("which", ["overwrite", "hidden"])
def test_identify_names_colluders_and_no_one_else(workdir, fleet, hidden_fleet, which):
    res, _, db = fleet if which == "overwrite" else hidden_fleet
    mixed = _average([res.issued[0].path, res.issued[2].path], workdir / f"mixed-{which}.onnx")
    with Registry.open(db, readonly=True) as reg:
        got = identify(mixed, reg, target=0.01)
        channels = {cust: IndexEntry.from_bytes(blob).channel for _, cust, blob in reg.index_rows()}
    colluders = {res.issued[0].customer, res.issued[2].customer}
    assert {m.customer for m in got.named} == colluders
    # where both edited one channel (the overwritten one is the least harmful: the same for every key) the
    # average holds 1/√2 of each direction: cosine ≈ 0.7, p ≈ 1e-4 at this model's m = 32 (hence the target
    # here); at MobileNetV2's m = 320 it is ≈ 1e-40 (tools/README.md, fleet). Apart, each keeps its whole
    # direction but the part along the original row, which identify projects out (≈ 1/√m of it)
    shared = len({channels[c] for c in colluders}) == 1
    assert all((0.5 < m.score < 0.9) if shared else m.score > 0.9 for m in got.named)


def test_identify_a_hidden_stain_needs_the_original(workdir, hidden_fleet, tmp_path):
    res, _, db = hidden_fleet
    with Registry.open(db, readonly=True) as reg:
        got = identify(res.issued[0].path, reg)  # the original is where it was at issue time
        assert got.basis == "white-box" and [m.customer for m in got.named] == [res.issued[0].customer]
        with pytest.raises(BadInputError, match="not the model these copies were issued from"):
            identify(res.issued[0].path, reg, original=res.issued[1].path)
    # the original moved away: the hidden stains are read from the black box, and it says so
    moved = tmp_path / "elsewhere.onnx"
    (workdir / "model.onnx").rename(moved)
    try:
        with Registry.open(db, readonly=True) as reg:
            got = identify(res.issued[0].path, reg)
            assert got.basis == "black-box" and got.best is not None and got.best.passed
            assert got.best.customer == res.issued[0].customer
            assert any("original model is not at hand" in n for n in got.notes)
            assert identify(res.issued[0].path, reg, original=moved).basis == "white-box"
    finally:
        moved.rename(workdir / "model.onnx")


def test_identify_finds_a_renamed_host(workdir, fleet):
    """An optimiser or re-export renames nodes: the host is the layer whose weights are the original's."""
    res, _, db = fleet
    m = onnx.load(res.issued[2].path)
    for i, node in enumerate(m.graph.node):
        node.name = f"renamed_{i}"
    onnx.save(m, workdir / "renamed.onnx")
    with Registry.open(db, readonly=True) as reg:
        got = identify(workdir / "renamed.onnx", reg, original=workdir / "model.onnx")
    assert got.basis == "white-box" and [c.customer for c in got.named] == [res.issued[2].customer]


@pytest.mark.parametrize("transform", ["fp16", "int8-dynamic", "int8-dynamic-channel"])
def test_identify_reads_a_transformed_copy(workdir, fleet, hidden_fleet, transform):
    """fp16 and onnxruntime's int8 (ConvInteger/MatMulInteger: the host node is gone) keep the host's rows up to
    rounding and per-channel scales: the white box finds them from the original's."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for res, db in ((fleet[0], fleet[2]), (hidden_fleet[0], hidden_fleet[2])):
        copy = res.issued[1]
        out = workdir / f"{transform}-{db.stem}.onnx"
        if transform == "fp16":
            from onnxconverter_common import float16

            onnx.save(float16.convert_float_to_float16(onnx.load(copy.path), keep_io_types=True), out)
        else:
            quantize_dynamic(str(copy.path), str(out), weight_type=QuantType.QInt8,
                             per_channel=transform.endswith("channel"))
        with Registry.open(db, readonly=True) as reg:
            got = identify(out, reg)
        assert got.basis == "white-box" and [m.customer for m in got.named] == [copy.customer]
        assert got.bound_log10 is not None and got.bound_log10 <= -6


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_issue_with_two_workers(workdir, images, tmp_path, backend):
    """Two workers share the customers; each issues through its own registry writer; every copy is its
    customer's (the same copies as one worker would issue with these seeds)."""
    if backend == "ray":
        pytest.importorskip("ray")
    from tinymodels import write_images

    from onnxstain.fleet.workers import issue_parallel

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    write_images(img_dir, images)
    dist, db = tmp_path / "dist", tmp_path / "f.db"
    dist.mkdir()
    names = ["w1", "w2", "w3", "w4", "w5"]
    res = issue_parallel(workdir / "model.onnx", names, dist, db, workers=2, backend=backend, images=img_dir,
                         options=StainOptions(variant="non-additive", fpr=0.05), seeds=list(range(40, 45)))
    assert res.workers == 2 and sorted(c.customer for c in res.issued) == names and res.throughput() > 0
    with Registry.open(db) as reg:
        assert reg.recovery.consistent and {r.state for r in reg.copies()} == {"issued"}
        for c in res.issued:
            key = onnxstain.Key.loaded(json.loads(reg.key_bytes(c.copy_id)))
            assert key.seed == 40 + names.index(c.customer)
            assert [m.customer for m in identify(c.path, reg).named] == [c.customer]
    again = issue_parallel(workdir / "model.onnx", names, dist, db, workers=2, backend=backend, images=img_dir)
    assert again.issued == [] and sorted(again.skipped) == names


def test_signed_copies(workdir, images, tmp_path):
    """Each copy signed with model-signing (its own verifier accepts it, a tampered copy fails) and a signed
    in-toto statement binding the copy's hash to its key commitment; verify and identify report both."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from onnxstain.fleet import signing

    signing.generate_key_pair(tmp_path / "vendor.pem", tmp_path / "vendor.pub")
    assert (tmp_path / "vendor.pem").stat().st_mode & 0o777 == 0o600
    dist, db = tmp_path / "dist", tmp_path / "f.db"
    dist.mkdir()
    with Registry.open(db, create=True) as reg:
        res = issue(workdir / "model.onnx", ["acme", "globex"], dist, reg, images=images, seeds=_seeds(60),
                    options=StainOptions(variant="non-additive", fpr=0.05), signing_key=tmp_path / "vendor.pem")
    copy = res.issued[0]
    sig, stmt = Path(f"{copy.path}.sig"), Path(f"{copy.path}.intoto.json")
    assert sig.is_file() and stmt.is_file()
    cli = Path(sys.executable).parent / "model_signing"
    ok = subprocess.run([str(cli), "verify", "key", str(copy.path), "--signature", str(sig), "--public_key",
                         str(tmp_path / "vendor.pub")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    body = json.loads(__import__("base64").b64decode(json.loads(stmt.read_text())["payload"]))
    with Registry.open(db, readonly=True) as reg:
        record = reg.get("acme")
    assert body["subject"][0]["digest"]["sha256"] == copy.model_sha256 == record.model_sha256
    assert body["predicate"]["key_commitment"] == record.key_commitment
    checked = signing.check_signatures(copy.path, tmp_path / "vendor.pub", record.key_commitment)
    assert checked is not None and checked.model_signature and checked.statement
    # verify and identify say so; without the public key they say the model is signed, unchecked
    with Registry.open(db, readonly=True) as reg:
        key = onnxstain.Key.loaded(json.loads(reg.key_bytes(copy.copy_id)))
        got = identify(copy.path, reg, signer_key=tmp_path / "vendor.pub")
    assert got.signature is not None and got.signature["model_signature"] is True
    v = onnxstain.verify(copy.path, key, signer_key=tmp_path / "vendor.pub")
    assert v.signature is not None and v.signature["statement"] is True
    assert any("--signer-key" in n for n in onnxstain.verify(copy.path, key).notes)
    # a tampered copy (one weight byte) fails both; a key pair of someone else fails both
    tampered = tmp_path / "t" / copy.path.name
    tampered.parent.mkdir()
    shutil.copy(copy.path, tampered)
    for suffix in (".sig", ".intoto.json"):
        shutil.copy(f"{copy.path}{suffix}", f"{tampered}{suffix}")
    data = bytearray(tampered.read_bytes())
    data[-100] ^= 0x01
    tampered.write_bytes(bytes(data))
    bad = signing.check_signatures(tampered, tmp_path / "vendor.pub", record.key_commitment)
    assert bad is not None and bad.model_signature is False and bad.statement is False
    bad = subprocess.run([str(cli), "verify", "key", str(tampered), "--signature", f"{tampered}.sig",
                          "--public_key", str(tmp_path / "vendor.pub")], capture_output=True, text=True)
    assert bad.returncode != 0
    signing.generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    other = signing.check_signatures(copy.path, tmp_path / "other.pub")
    assert other is not None and other.model_signature is False and other.statement is False


def test_identify_through_an_endpoint(fleet, tmp_path):
    """tools/serve_model.py serves a copy on 127.0.0.1; identify queries it (black box: the screen, then the
    signature with the controls made from the trigger, through the endpoint)."""
    import sys
    import threading
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import serve_model

    res, _, db = fleet
    copy = res.issued[2]
    server = serve_model.make_server(copy.path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    try:
        with Registry.open(db, readonly=True) as reg:
            got = identify(None, reg, endpoint=url)
            keys = len(reg.copies())
            with pytest.raises(BadInputError, match="budget"):
                identify(None, reg, endpoint=url, query_budget=1)
            with pytest.raises(BadInputError, match="404"):
                identify(None, reg, endpoint=url.replace("/predict", "/nothing"))
        # the tiny model's cross-key bounds are near 1: the right key passes, no other, and no one is named
        assert got.model == url and got.model_sha256 is None and got.basis == "black-box"
        assert got.best is not None and got.best.customer == copy.customer and got.best.passed
        assert got.runner_up is not None and not got.runner_up.passed
        assert got.queries == keys + 4  # one trigger per key, then the passing key's trigger and 3 controls
        r = CliRunner().invoke(main, ["identify", "--endpoint", url, "--registry", str(db)])
        assert r.exit_code == 1 and copy.customer in r.output, r.output
    finally:
        server.shutdown()
    with Registry.open(db, readonly=True) as reg, pytest.raises(BadInputError, match="one of them"):
        identify(copy.path, reg, endpoint=url)


def test_cosine_bound_is_the_spherical_cap():
    rng = np.random.default_rng(0)
    m, n = 64, 20000
    v = rng.standard_normal((n, m))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    fixed = np.tile(rng.standard_normal(m), (n, 1))
    s = ident.score(fixed, v, m)
    t = 0.25
    measured = float(np.mean(s.cos >= t))
    predicted = float(10 ** ident.log10_tail(np.array([t]), m)[0])
    assert abs(measured - predicted) < 4 * np.sqrt(predicted / n)
    thr = ident.threshold(m, keys=10_000, target=1e-6)
    assert 10_000 * 10 ** ident.log10_tail(np.array([thr]), m)[0] <= 1e-6 * (1 + 1e-9)
    assert ident.cosines(np.zeros((1, m)), v[:1])[0] == 0.0  # no change: no evidence


def test_customer_lists(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,customer\n1,acme\n2,globex\n\n")
    assert read_customers(p) == ["acme", "globex"]
    p.write_text("acme\nglobex\n")
    assert read_customers(p) == ["acme", "globex"]
    for bad, why in ((["a", "a"], "twice"), (["../x"], "file name"), (["123"], "file name"), ([], "no customers")):
        with pytest.raises(BadInputError, match=why):
            check_customers(bad)


def test_cli_issue_identify_registry(workdir, images, tmp_path):
    from tinymodels import write_images

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    write_images(img_dir, images[:48])
    (tmp_path / "c.csv").write_text("customer\nalpha\nbeta\n")
    db, dist = tmp_path / "f.db", tmp_path / "dist"
    run = CliRunner().invoke
    r = run(main, ["keygen", str(tmp_path / "v.pem"), str(tmp_path / "v.pub")])
    assert r.exit_code == 0, r.output
    r = run(main, ["issue", str(workdir / "model.onnx"), "--customers", str(tmp_path / "c.csv"), "-o", str(dist),
                   "--registry", str(db), "--images", str(img_dir), "--fpr", "0.05", "--quiet",
                   "--json", str(tmp_path / "issue.json"), "--signing-key", str(tmp_path / "v.pem")])
    assert r.exit_code == 0, r.output
    assert "issued 2 copies" in r.output and json.loads((tmp_path / "issue.json").read_text())["issued"]
    r = run(main, ["identify", str(dist / "beta.onnx"), "--registry", str(db), "--json", str(tmp_path / "id.json"),
                   "--signer-key", str(tmp_path / "v.pub")])
    assert r.exit_code == 0 and "IDENTIFIED" in r.output and "beta" in r.output, r.output
    assert "beta.onnx.sig: valid" in r.output and "beta.onnx.intoto.json: valid" in r.output, r.output
    assert json.loads((tmp_path / "id.json").read_text())["named"][0]["customer"] == "beta"
    r = run(main, ["identify", str(workdir / "model.onnx"), "--registry", str(db)])
    assert r.exit_code == 1 and "NOT IDENTIFIED" in r.output, r.output
    r = run(main, ["registry", "list", str(db)])
    assert r.exit_code == 0 and "alpha" in r.output and "beta" in r.output
    r = run(main, ["identify", str(dist / "beta.onnx"), "--registry", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output


@pytest.mark.slow
def test_issue_survives_a_kill_and_a_concurrent_run(tmp_path):
    """The real command killed mid-run, and two runs at once (tools/fleet_kill.py; 20 trials in tools/README)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import fleet_kill

    assert fleet_kill.main(["--trials", "1", "--workdir", str(tmp_path / "k"), "--min-delay", "6",
                            "--max-delay", "8"]) == 0
