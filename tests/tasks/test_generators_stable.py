"""The built-in generated tasks are pinned item for item: for seed 0, every split's examples (all
their fields, as JSON) hash to the digests recorded here. A refactor of the generators must leave
them byte-identical; a deliberate change of the items updates the digests (and says so)."""

import dataclasses
import hashlib
import json

import pytest

from t2ray.tasks import SPLITS, get_task

# Computed on the generators as they were before folding their repeated code into helpers.
EXPECTED: dict[str, dict[str, str]] = {
    "math": {
        "train": "26ca1e55d9901676f7fdb8b3c05dffb4a1ebc6c5300c878f89b1fa07d28edc9f",
        "valid": "f5031df8959347a1116c6b1e02452ef8bdc5c77d04401c2a8965395c2cb357dd",
        "test": "7bba4c569ec85b4a5fa1e9f9a9a5ee0bad42b614c5abc3fdafcf4b7074b721e5",
    },
    "code": {
        "train": "c2bf24db7ba8aed5404a5281d7a0b6c585a0b1546c2654ef9cabd11ec6fd6dd2",
        "valid": "17ca72975f507d817926646984b46fbeb02e3290b3083aed35fc4ab86a633f7e",
        "test": "e2cbe6d706c1466bc8326ec5529b9c094d51e5c557159ed7f50707ac387dc522",
    },
    "reasoning": {
        "train": "ca1c2a965114dfaa3eaf7e0910559642b9b7cd4f3037cc958204729259b5ccb8",
        "valid": "ee72189997c1ed8228c39ada7c2a3d341864fcec7e19cbc893db775aade96ca9",
        "test": "48a6e29606389f40ca9bf4f3271f6bd26b7fa8864d82e5447a1aa500550eccf0",
    },
    "math-hard": {
        "train": "35dd26d1d645a6b4a5cd7a655618ab94de34f41f162228e8d7bba93c92e10015",
        "valid": "a582eb6875bfabf6dd8990cf4a74be87a47cbedf92b41568f6d6414ad621f3a8",
        "test": "ef54f0b514524e25fdb7b0db47109adf503adc43cf71067c97677443a5ba7558",
    },
    "code-hard": {
        "train": "bb51b5407629db8eec6245cd134eb71f9ec1f2004fc87c85f4ae3c64970005ce",
        "valid": "3d8c67e32791fba080709cf922d95fb776be2e11c41d4368754520a8062c7d0b",
        "test": "bda675de74781d2d963dab9e4b839a976bfedafe79e39cbae96a5f23e35e9fe5",
    },
    "reasoning-hard": {
        "train": "6327e8613baf3bf06aebb67f6e08c09154196ee983c259328b3ad64d91cc2284",
        "valid": "08dd3f5e7847db7abfda12fcfd0611e627b2de825abd0fc370368735619bb642",
        "test": "e6b63bdb8f6b381d6a0fc8b766c3c5c63e469098e97d1f5cbbb632ccf6d3c8a0",
    },
    "cls": {
        "train": "0fed53edc17ed328c7e0e128f44a0682246bf65f6fe3bd3ed159c53692be7f95",
        "valid": "c5450f2919a814dbae9dd87ef8c894bca29498bda0b5ac5129f287257ef98d1b",
        "test": "f452b56e628d0cea9ee2d1d1612847c52aa703419c6fe16e4a590ac895eae1c5",
    },
    "cls-benchmarks": {
        "train": "d531197d5b0028538fd39730f7c369e4b44a1f4624ea763bb3f7742e3cd9d081",
        "valid": "e76c88ae8d6d8ee3c7ea3954a4184bd30bc3396a2cdb3b1aeec5c679899f9e03",
        "test": "8008bac49b6c7ecc91864ee282f4fb822e015bb3969197630d0165ad96466a35",
    },
}


def split_digest(examples) -> str:
    items = [dataclasses.asdict(ex) for ex in examples]
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_generated_items_unchanged(name):
    task = get_task(name, seed=0)
    got = {split: split_digest(task.examples(split)) for split in SPLITS}
    assert got == EXPECTED[name]
