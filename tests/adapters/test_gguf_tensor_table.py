"""The GGUF tensor table read without the metadata: the same entries as gguf's GGUFReader, clear errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from adapters.gguf_tensor_table import GGUFTableError, cached_tensor_table, is_unquantised, read_tensor_table


def _write(path, *, alignment: int | None = None, quantised: bool = False):
    """A small GGUF with every kind of metadata value (a vocabulary-like string array too) and mixed tensors."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("test.u32", 7)
    w.add_int8("test.i8", -3)
    w.add_float64("test.f64", 0.5)
    w.add_bool("test.flag", True)
    w.add_string("test.text", "héllo")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" * (i % 5 + 1) for i in range(500)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(500)])
    w.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((500, 64)).astype(np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    if quantised:
        values = rng.standard_normal((32, 64)).astype(np.float32)
        w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _reference(path):
    return [(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)), int(t.data_offset))
            for t in gguf.GGUFReader(path).tensors]


@pytest.mark.parametrize("alignment, quantised", [(None, False), (64, True), (256, False)])
def test_table_equals_gguf_readers(tmp_path, alignment, quantised):
    path = _write(tmp_path / "m.gguf", alignment=alignment, quantised=quantised)
    table = read_tensor_table(path)
    assert [(e.name, e.ggml_type, e.shape, e.offset) for e in table] == _reference(path)
    assert is_unquantised(table) is not quantised
    if alignment:
        assert all(e.offset % alignment == 0 for e in table)
    # the offsets point at the data: the f16 tensor reads back from the raw bytes
    q = next(e for e in table if e.name == "blk.0.attn_q.weight")
    raw = np.fromfile(path, dtype=np.float16, count=64 * 64, offset=q.offset).reshape(q.shape)
    np.testing.assert_array_equal(raw, next(t.data for t in gguf.GGUFReader(path).tensors if t.name == q.name))


def test_cached_table_follows_the_file_version(tmp_path):
    path = _write(tmp_path / "m.gguf")
    st = path.stat()
    first = cached_tensor_table(str(path), st.st_size, st.st_mtime_ns)
    assert cached_tensor_table(str(path), st.st_size, st.st_mtime_ns) is first
    assert cached_tensor_table(str(path), st.st_size, st.st_mtime_ns + 1) is not first  # touched: read again
    _write(path, quantised=True)
    st = path.stat()
    assert not is_unquantised(cached_tensor_table(str(path), st.st_size, st.st_mtime_ns))


def test_damaged_files_get_an_error_naming_the_file(tmp_path):
    path = _write(tmp_path / "m.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:3000])  # inside the string array
    with pytest.raises(GGUFTableError, match=r"cut\.gguf.*truncated"):
        read_tensor_table(cut)
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFTableError, match=r"wrong\.gguf: not a GGUF file"):
        read_tensor_table(wrong)
    old = tmp_path / "v9.gguf"
    old.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFTableError, match="version 9"):
        read_tensor_table(old)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFTableError, match=r"empty\.gguf: cannot be read"):
        read_tensor_table(empty)
    with pytest.raises(GGUFTableError, match=r"missing\.gguf: cannot be read"):
        read_tensor_table(tmp_path / "missing.gguf")


def test_a_file_cut_inside_its_data_or_with_a_bad_alignment_is_refused(tmp_path):
    """The table alone would parse; the tensors' bytes or offsets would be wrong, and merged rollout weights
    would be patched into the wrong bytes."""
    path = _write(tmp_path / "m.gguf")
    data = path.read_bytes()
    last = read_tensor_table(path)[-1]
    cut = tmp_path / "cut-data.gguf"
    cut.write_bytes(data[:last.offset + 10])
    with pytest.raises(GGUFTableError, match=r"cut-data\.gguf: tensor 'blk\.0\.attn_q\.weight' ends at .* past"):
        read_tensor_table(cut)
    for alignment, why in ((48, "not a power of two"), (0, "not a power of two")):
        odd = tmp_path / f"align-{alignment}.gguf"
        w = gguf.GGUFWriter(odd, "llama")
        w.add_uint32("general.alignment", alignment)
        w.add_tensor("x.weight", np.ones(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(GGUFTableError, match=why):
            read_tensor_table(odd)
