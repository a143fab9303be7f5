"""The public surface: names users import must not disappear silently."""

import vlaligner
import vlaligner.functional as functional

CORE_NAMES = {
    "MultiQueryGenerator", "MultiMaskGenerator", "MultiQueryEstimator", "VisionLanguageAligner",
    "AlignerOutput", "FixedKernelHead", "FusionNeck", "__version__",
}
FUNCTIONAL_NAMES = {
    "dynamic_conv2d", "split_dynamic_params", "fuse_dynamic_kernels", "weighted_mask_sum", "mixture_of_masks_logits",
    "coord_features", "DynamicConvMethod",
}


def test_core_public_names_are_pinned():
    assert set(vlaligner.__all__) == CORE_NAMES
    for name in CORE_NAMES:
        assert getattr(vlaligner, name) is not None


def test_functional_public_names_are_pinned():
    assert set(functional.__all__) == FUNCTIONAL_NAMES
    for name in FUNCTIONAL_NAMES:
        assert hasattr(functional, name)


def test_version_is_a_release_string():
    major, minor, patch = vlaligner.__version__.split(".")[:3]
    assert major.isdigit() and minor.isdigit()


def test_star_import_is_torch_only():
    namespace = {}
    exec("from vlaligner import *", namespace)
    assert CORE_NAMES - {"__version__"} <= set(namespace)
