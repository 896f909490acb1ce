"""The guard on store keys: what a store item holds may change only with its key. Each kind of item
(dataset, teacher, trajectories, latents) is made by its stage from a tiny config and summed up
(tests/store_golden.py), then compared, within a tolerance, with the golden summary recorded beside the
key it had and the CODE_VERSION entry of its kind (stages/config/store_keys.py):

- same key, other content: the code changed what the stage writes and the key did not move, so every
  team's store would serve the old items as if they were the new ones. Bump the kind's CODE_VERSION
  entry (its items are then made again under new keys), then regenerate the golden file;
- another key: the key moved on purpose (a config or CODE_VERSION change, which
  tests/golden/stage_configs.json records): regenerate the golden file.

Regenerate it, from anywhere with the venv active (about 30 s):

    python tests/golden/record_store_items.py tests/golden/store_items.json
"""

import json
from pathlib import Path

import pytest
import store_golden

from stages.config import store_keys

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "store_items.json"
GOLDEN = json.loads(GOLDEN_FILE.read_text())
REGENERATE = f"python tests/golden/record_store_items.py {GOLDEN_FILE.relative_to(store_golden.REPO)}"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return store_golden.make(tmp_path_factory.mktemp("store-items"))


def test_every_kind_of_store_item_has_a_golden_summary():
    assert set(GOLDEN) == set(store_golden.KINDS) == set(store_keys.CODE_VERSION)


@pytest.mark.parametrize("kind", store_golden.KINDS)
def test_what_an_item_holds_changes_only_with_its_key(made, kind):
    golden, now = GOLDEN[kind], made[kind]
    if now["key"] != golden["key"]:
        pytest.fail(f"the {kind} key moved ({golden['key']} in {GOLDEN_FILE.name}, code version "
                    f"{golden['code_version']}; {now['key']} now, code version {now['code_version']}): "
                    f"regenerate the golden file: {REGENERATE}")
    found = store_golden.differences({k: v for k, v in golden.items() if k != "key"},
                                     {k: v for k, v in now.items() if k != "key"}, *store_golden.TOLERANCE[kind])
    assert not found, (
        f"what a {kind} item holds changed while its key {now['key']} did not ({len(found)} differences, e.g. "
        f"{'; '.join(found[:3])}). Bump CODE_VERSION[{kind!r}] in stages/config/store_keys.py (every store then "
        f"makes its {kind} items again, under new keys), then regenerate the golden file: {REGENERATE}")


def test_the_comparison_sees_a_change_beyond_the_tolerance_and_not_within_it():
    golden = {"a": {"mean": 1.0, "head": [0.5, 2.0], "dtype": "float16"}}
    assert store_golden.differences(golden, {"a": {"mean": 1.0 + 1e-7, "head": [0.5, 2.0], "dtype": "float16"}},
                                    1e-6, 0) == []
    assert store_golden.differences(golden, {"a": {"mean": 1.01, "head": [0.5, 2.0], "dtype": "float16"}},
                                    1e-6, 0) == ["/a/mean: 1.0 in the golden, 1.01 now"]
    other = {"a": {"mean": 1.0, "head": [0.5], "dtype": "float32"}}
    assert sorted(store_golden.differences(golden, other, 1e-6, 0)) == [
        "/a/dtype: 'float16' in the golden, 'float32' now", "/a/head: 2 entries in the golden, 1 now"]
    assert store_golden.differences(golden, {"a": {"mean": 1.0}}, 1e-6, 0)[0].startswith("/a: fields")
