"""Pages given back to the OS: a model file's map stays readable, and released rows of an anonymous array are the
only ones that change."""
import numpy as np

from powerinfer.formats.loader import load_model
from powerinfer.formats.pages import PAGE, file_maps, release_file_pages, release_rows


def test_file_pages_are_released_and_reread(bundled_model_path):
    loaded = load_model(bundled_model_path)
    t = loaded.weights.layers[3].up_proj
    before = np.array(t.data, copy=True)
    assert len(file_maps([t.data])) == 1
    assert release_file_pages(loaded) == 1
    assert np.array_equal(np.asarray(t.data), before)  # faulted back in from the file


def test_released_rows_read_zero_and_the_rest_is_kept():
    rows, row_bytes = 64, 3 * PAGE // 2  # rows that straddle pages
    a = np.full((rows, row_bytes), 7, dtype=np.uint8)
    keep = a.copy()
    gone = np.arange(8, 40)
    released = release_rows(a, gone)
    assert released >= (len(gone) * row_bytes) - 2 * PAGE and released % PAGE == 0
    other = np.setdiff1d(np.arange(rows), gone)
    assert np.array_equal(a[other], keep[other])  # rows outside the released range are untouched
    assert (a[gone] == 0).mean() > 0.9  # whole pages inside the released rows now read as zeros
