"""SimCLR subset lists: the real ImageNet 1% / 10% files shipped in the package, mapping onto an ImageFolder tree,
balanced draws."""

from pathlib import Path

import pytest

from common.imagefolder import RobustImageFolder
from transfer.subsets import (
    SHIPPED_DIR,
    SubsetError,
    balanced_subset,
    class_of,
    read_subset_list,
    resolve_subset_list,
    subset_classes,
    subset_indices,
    write_subset_list,
)


@pytest.fixture(scope="module")
def one_percent() -> list[str]:
    return read_subset_list("1percent")  # by name: the shipped copy


@pytest.fixture(scope="module")
def ten_percent() -> list[str]:
    return read_subset_list("10percent")


def test_lists_are_shipped_inside_the_package_and_named_by_the_default_config():
    from common.config import compose_config

    assert resolve_subset_list("1percent") == SHIPPED_DIR / "1percent.txt"
    assert resolve_subset_list("10percent").is_file() and resolve_subset_list("1percent").is_file()
    assert SHIPPED_DIR.parent == Path(__import__("transfer.subsets").subsets.__file__).resolve().parent
    assert resolve_subset_list("other/list.txt") == Path("other/list.txt")  # anything else is a path
    assert compose_config("semi", []).subset.list == "10percent"
    assert compose_config("semi", ["eval/semi=imagenet_1pct"]).subset.list == "1percent"
    # declared as package data, so an installed (non-editable) package carries them
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"imagenet_subsets/*.txt"' in pyproject and '"lists/*.txt"' in pyproject


def test_real_simclr_lists_are_read(one_percent, ten_percent):
    assert len(one_percent) == 12811
    assert len(ten_percent) == 128116
    assert len(subset_classes(one_percent)) == 1000
    assert len(subset_classes(ten_percent)) == 1000
    assert all(class_of(n).startswith("n") and len(class_of(n)) == 9 for n in one_percent[:100])


def _make_tree(root: Path, names) -> None:
    """An ImageFolder tree <root>/<wnid>/<file> of empty files (ImageFolder only scans names)."""
    for n in names:
        folder = root / class_of(n)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / n).touch()


@pytest.fixture(scope="module")
def one_percent_tree(tmp_path_factory, one_percent) -> Path:
    root = tmp_path_factory.mktemp("imagenet1pct") / "train"
    _make_tree(root, one_percent)
    return root


def test_one_percent_list_maps_onto_an_imagefolder_tree(one_percent_tree, one_percent, ten_percent):
    root = one_percent_tree
    ds = RobustImageFolder(root)
    assert len(ds.classes) == 1000
    idx = subset_indices(ds.samples, one_percent, root=str(root))
    assert len(idx) == len(set(idx)) == 12811
    assert {ds.samples[i][1] for i in idx} == set(range(1000))
    # The listed file and the mapped sample agree (class folder and name).
    for name, i in list(zip(one_percent, idx))[:50]:
        path = Path(ds.samples[i][0])
        assert path.name == name and ds.classes[ds.samples[i][1]] == class_of(name) == path.parent.name

    # The 10% list on this tree: every file not in the 1% list is missing, and the error says how many.
    n_missing = len(set(ten_percent) - set(one_percent))
    with pytest.raises(SubsetError, match=rf"{n_missing} of the 128116 files .* are not in"):
        subset_indices(ds.samples, ten_percent, root=str(root))


def test_tree_missing_some_listed_files_is_an_error_naming_them(tmp_path, one_percent_tree, one_percent):
    root = one_percent_tree
    gone = one_percent[5:8]
    for n in gone:  # moved out of the tree for this test, put back afterwards
        (root / class_of(n) / n).rename(tmp_path / n)
    try:
        ds = RobustImageFolder(root)
        with pytest.raises(SubsetError) as e:
            subset_indices(ds.samples, one_percent, root=str(root))
    finally:
        for n in gone:
            (tmp_path / n).rename(root / class_of(n) / n)
    msg = str(e.value)
    assert "3 of the 12811 files" in msg
    assert all(n in msg for n in gone)
    assert "fix:" in msg


def test_malformed_and_duplicate_lines_are_rejected(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("n01440764_10026.JPEG\nnot a file name\n")
    with pytest.raises(SubsetError, match="not <class>_<id>"):
        read_subset_list(bad)
    dup = tmp_path / "dup.txt"
    dup.write_text("n01440764_1.JPEG\n\nn01440764_1.JPEG\n")
    with pytest.raises(SubsetError, match="twice"):
        read_subset_list(dup)
    with pytest.raises(SubsetError, match="does not exist"):
        read_subset_list(tmp_path / "nope.txt")


def test_balanced_subset_is_deterministic_per_class_and_round_trips(tmp_path, tiny_synthetic):
    ds = RobustImageFolder(tiny_synthetic / "classification" / "train")  # 10 classes x 12 images
    a = balanced_subset(ds.samples, 10, seed=0)
    assert a == balanced_subset(ds.samples, 10, seed=0)
    assert a != balanced_subset(ds.samples, 10, seed=1)
    per_class = {}
    for n in a:
        per_class[class_of(n)] = per_class.get(class_of(n), 0) + 1
    assert per_class == {c: 2 for c in ds.classes}  # ceil(12 * 10%) = 2 of every class
    assert len(balanced_subset(ds.samples, 50, seed=0)) == 60
    path = write_subset_list(tmp_path / "subset_10pct.txt", a)
    back = read_subset_list(path)
    assert back == a
    idx = subset_indices(ds.samples, back)
    assert sorted({ds.samples[i][1] for i in idx}) == list(range(10))
