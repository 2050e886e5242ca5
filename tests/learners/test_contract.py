"""The learner contract (:mod:`ocl.learners.checks`) on every shipped learner config and on the
README's example learner: finite normalised log-probabilities, predictions blind to their own
and later labels, same seed same run, exact resume from a checkpoint, a stateless
``evaluate``, and OCLError for bad shapes and labels. A new learner config is checked by
being there."""

import functools
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from ocl.build import available_learners
from ocl.learners.checks import CHECKS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: Settings that keep the checks' 48-example streams fast (each learner otherwise as shipped).
FAST = {
    "transformer": ["learner.d_model=32"],
    "pooled": ["learner.experts=[{name:transformer,d_model:32},linear,slda]"],
    "avalanche_gdumb": ["learner.experience_size=8", "learner.train_epochs=2"],  # retrains within the stream
    # narrower, and refreshed within the 48 examples (eigendecompositions and lambda choices checked too)
    "ranpac": ["+learner.dim=64", "+learner.first_refresh=4", "+learner.refresh_every=16"],
    "randumb": ["+learner.dim=64"],
}


#: More pools than the shipped ones (pooled, readout_pool): other expert sets, as the command line
#: gives them. "readme" in an item: the README's example learner as a plug-in expert.
POOLS = {
    "pooled[transformer,ncm]": ["learner.experts=[{name:transformer,d_model:32},ncm]"],
    "pooled[linear,readme]": ["learner.experts=[linear,{_target_:my_ocl.Prototypes,temperature:5.0}]"],
    "pooled[linear,slda]fixed_share,lagged": ["learner.experts=[linear,slda]", "learner.pool=fixed_share",
                                              "learner.heldout_scores=lagged", "learner.heldout_lag=6"],
    # Transformer-XL segments (a step every 5 examples: resume mid-segment), both label modes
    "pooled[transformer segment=5]": ["learner.experts=[{name:transformer,d_model:32,segment:5}]"],
    "pooled[transformer segment=3 context]": [
        "learner.experts=[{name:transformer,d_model:32,segment:3,label_mode:context}]"],
}


def shipped(name: str, overrides: list[str] | None = None):
    """The learner config ``name`` as ``ocl run learner=NAME`` composes it: a partial factory."""
    with initialize_config_module(config_module="ocl.configs", version_base=None):
        cfg = compose(config_name="config", overrides=[f"learner={name}", *(overrides or FAST.get(name, []))])
    return instantiate(cfg.learner, _convert_="all")


@pytest.fixture(scope="module")
def readme_learner(tmp_path_factory, readme_example):
    """The README's example learner, imported from a module file as ``ocl run`` would (a
    checkpoint pickles it by module path)."""
    folder = tmp_path_factory.mktemp("readme_learner")
    (folder / "my_ocl.py").write_text(readme_example("my_ocl.py"))
    sys.path.insert(0, str(folder))
    try:
        import my_ocl

        yield functools.partial(my_ocl.Prototypes, temperature=5.0)
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("my_ocl", None)


LEARNERS = [*available_learners(), "readme", *POOLS]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", LEARNERS)
def test_learner_contract(name, check, request):
    if name == "readme" or "readme" in name:
        request.getfixturevalue("readme_learner")  # my_ocl importable
    if name == "readme":
        factory = request.getfixturevalue("readme_learner")
    elif name in POOLS:
        factory = shipped("pooled", POOLS[name])
    else:
        factory = shipped(name)
    check(factory)
