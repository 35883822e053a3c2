import os
import stat

import numpy as np
import onnx
import pytest
from tinymodels import tiny_cnn

from onnxstain._onnx.io import check_output_path, load_model, save_model, write_bytes_atomic
from onnxstain.errors import BadInputError, BadModelError


@pytest.fixture
def tiny_path(tmp_path):
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), p)
    return p


def test_load_reports_sha_and_model(tiny_path):
    loaded = load_model(tiny_path)
    assert len(loaded.sha256) == 64
    assert loaded.model.graph.node[0].op_type == "Conv"
    assert not loaded.external_data


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all\n" * 10, os.urandom(4096)])
def test_garbage_is_one_clear_error(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BadModelError, match="not an ONNX model"):
        load_model(p)


def test_truncated_model(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadModelError):
        load_model(p)


def test_missing_file(tmp_path):
    with pytest.raises(BadModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_save_restores_fields_and_is_atomic(tmp_path, tiny_path):
    src = load_model(tiny_path)
    edited = onnx.ModelProto()
    edited.CopyFrom(src.model)
    edited.ir_version = 10
    edited.producer_name = "something else"
    del edited.metadata_props[:]
    out = tmp_path / "out.onnx"
    digest = save_model(edited, out, source=src)
    back = onnx.load(out)
    assert back.ir_version == src.model.ir_version
    assert back.producer_name == "tiny-test"
    assert back.doc_string == "a tiny test model"
    assert [(p.key, p.value) for p in back.metadata_props] == [("author", "tests")]
    assert list(back.opset_import) == list(src.model.opset_import)
    assert len(digest) == 64
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_refuses_invalid_model_and_leaves_nothing(tmp_path, tiny_path):
    src = load_model(tiny_path)
    broken = onnx.ModelProto()
    broken.CopyFrom(src.model)
    broken.graph.node[0].input[1] = "does_not_exist"
    out = tmp_path / "out.onnx"
    with pytest.raises(BadModelError, match="checker"):
        save_model(broken, out, source=src)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_output_equal_to_input_refused(tiny_path):
    with pytest.raises(BadInputError, match="never modifies its input"):
        check_output_path(tiny_path, tiny_path)
    with pytest.raises(BadInputError):
        check_output_path(tiny_path.parent / "." / tiny_path.name, tiny_path)


def test_external_data_round_trip(tmp_path, tiny_path):
    src = load_model(tiny_path)
    out = tmp_path / "ext.onnx"
    save_model(src.model, out, source=src, external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    back = load_model(out)
    assert back.external_data
    w = {t.name: onnx.numpy_helper.to_array(t) for t in back.model.graph.initializer}
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in tiny_cnn().graph.initializer}
    assert all(np.array_equal(w[k], w0[k]) for k in w0)


def test_write_bytes_atomic_permissions(tmp_path):
    p = tmp_path / "secret.key"
    write_bytes_atomic(p, b"abc", mode=0o600)
    assert p.read_bytes() == b"abc"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
