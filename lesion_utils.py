"""The lesion engine's public API: one import for notebooks and scripts (`import lesion_utils as L`).

A lesion silences chosen output channels of one site by multiplying the site's output, after its BN and ReLU, by
a mask (never by editing weights: a BN shift would keep a zeroed filter's channel alive). Sites are each conv
layer's ReLU output for VGG, and the stem and each bottleneck block's output (after the residual add and ReLU)
for ResNet/ResNeXt, named by their module path in `model.named_modules()`.

The code lives in the package `dualtask` (docs/architecture.md): sites in `dualtask.model.sites`, masks and
evaluation in `dualtask.lesion.engine`, the rankings in `dualtask.lesion.rankings` and `.greedy`, readouts in
`.readouts`, the index and its statistics in `.dissociation`, and the sweep over a run's sites in `.sweep`.

    import lesion_utils as L
    sites = L.lesion_sites(model)
    batches = L.image_batches(images, "test")   # compact=True: uint8 on the device, a quarter of the memory
    results = L.evaluate_lesions(model, sites[12], [[0, 5, 9]], batches)   # one lesion: channels 0, 5 and 9

A network trained elsewhere, from the shell (`python lesion_utils.py --network=resnet18 ...`, `--help` lists the
settings) or in one call (dualtask.experiment.analyse):

    tables = L.analyse(torchvision.models.resnet18(), "runs/mine", image_size=32, device="cpu")
    tables = L.load_results("runs/mine")    # any run folder's tables as pandas DataFrames
"""
from dualtask.core.names import METHODS, SWEEP_FILES
from dualtask.lesion.dissociation import (
    DISSOCIATION_COLUMNS,
    LESION_COLUMNS,
    corrected_drop,
    dissociation_rows,
    read_per_image,
)
from dualtask.lesion.engine import (
    SiteRunner,
    ablate,
    evaluate_lesions,
    evaluate_lesions_naive,
    image_batches,
    lesion_mask,
    model_input,
    site_activations,
)
from dualtask.lesion.greedy import GREEDY_DEFAULTS, RankingImages, greedy_order
from dualtask.lesion.rankings import (
    loss_scores,
    rank_by_activation,
    rank_site,
    selectivity,
    split_half_reliability,
    taylor_scores,
    top_overlap,
)
from dualtask.lesion.readouts import fixed_lesions, fixed_readouts, refit_lesions
from dualtask.lesion.sweep import Sweep, lesion_stage
from dualtask.model.sites import (
    Site,
    forward_chain,
    get_site,
    lesion_sites,
    receptive_fields,
    select_sites,
)


def analyse(network, out_dir, **settings) -> dict:
    """A network trained elsewhere (an nn.Module or a name) analysed as `python lesion_utils.py` does; its tables as
    pandas DataFrames (dualtask.experiment.analyse.analyse)."""
    from dualtask.experiment.analyse import analyse as run

    return run(network, out_dir, **settings)


def load_results(run_dir) -> dict:
    """{table: pandas DataFrame} of any run folder (dualtask.experiment.analyse.load_results)."""
    from dualtask.experiment.analyse import load_results as read

    return read(run_dir)


__all__ = ["DISSOCIATION_COLUMNS", "GREEDY_DEFAULTS", "LESION_COLUMNS", "METHODS", "RankingImages", "SWEEP_FILES",
           "Site", "SiteRunner", "Sweep", "ablate", "analyse", "corrected_drop", "dissociation_rows",
           "evaluate_lesions", "evaluate_lesions_naive", "fixed_lesions", "fixed_readouts", "forward_chain",
           "get_site", "greedy_order", "image_batches", "lesion_mask", "lesion_sites", "lesion_stage",
           "load_results", "loss_scores", "model_input", "rank_by_activation", "rank_site", "read_per_image",
           "receptive_fields", "refit_lesions", "select_sites", "selectivity", "site_activations",
           "split_half_reliability", "taylor_scores", "top_overlap"]


if __name__ == "__main__":  # a network trained elsewhere, from the shell
    from dualtask.experiment.analyse import main

    main()
