"""A network trained elsewhere: its filters lesioned and read through linear readouts of two tasks.

    python own_network.py --network=resnet18 --image_size=32 --device=cpu
    python own_network.py --network=resnet50 --weights=pretrained      # torchvision's ImageNet weights (downloaded once)
    python own_network.py --network=resnet18 --weights=my_resnet18.pt  # torch.save(model.state_dict(), path)

Nothing is trained: each task is read by a linear head fitted to the frozen network's features at
`readout_layer` (and by fixed readouts cross-fitted on the test images). Every setting below can be changed here
or from the shell (`--name=value`); `--help` lists them.
"""
network = "resnet18"  # a torchvision classification model's name (resnet50, convnext_tiny, mobilenet_v2, densenet121, googlenet, ... or "torchvision:<name>"), or "timm:<name>" (pip install timm)
weights = "random"  # "random", "pretrained" (the library's published weights, downloaded only when asked) or a path to a state-dict file of that network
readout_layer = None  # where the readouts read the network: None = the input of its last linear layer (e.g. "flatten"), or a node name of its traced graph
face_data = "demo"  # VGGFace2 root or cache, a folder of identity folders, or 'demo'
object_data = "demo"  # CIFAR-10 root (with cifar-10-batches-py/), a folder of class folders, or 'demo'
tasks = None  # {task: data spec} replacing the <task>_data settings, e.g. {'identity': 'demo', 'expression': 'demo'}; tasks reading the same source share its images (each image carries both labels); None = the <task>_data settings
kdef_views = ["S"]  # KDEF camera angles used: S (frontal), HL/HR (half left/right), FL/FR (full left/right)
face_crop = "boxes"  # face photographs: "boxes" (VGGFace2's loose boxes, LFW's fixed box, +30%), "detect" (OpenCV's face detector, +30%), "align" (VGGFace2's 5 landmarks), "none" (whole)
download = False  # fetch CIFAR-10 into object_data when it is missing there
image_size = 64  # both tasks are resized to image_size x image_size pixels (ImageNet networks were trained at 224)
max_per_class = None  # cap on images per class (identity or category); None = all
max_classes = None  # cap on classes per task (the first N by name); None = all
demo_per_class = 100  # images per class of the procedural demo set
batch_size = 128  # images per step, split evenly between the tasks
seed = 0  # seeds data sampling, splits, initialisation, augmentation and lesion controls
device = "auto"  # 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'
retrain = False  # fit the readout heads again even when out_dir holds them
out_dir = "runs/own_network"  # where config.json, checkpoint.pt (the fitted heads), lesion_results.csv, report.html and figures/ go
lesion_fractions = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]  # fractions of a layer's filters silenced in the lesion sweep
lesion_methods = ["activation", "random"]  # rankings: activation, localiser, loss, greedy, taylor, mask, random (loss and greedy are the reference study's; costly on a CPU)
greedy_stop = 0.2  # the greedy ranking chooses filters in steps of 1.6% of a site until just past this fraction (the reference study's 0.2); greedy lesions beyond it are marked in lesion_results.csv
greedy_racing = True  # race each greedy step: drop filters confidently below the step's cut on a slice of the ranking images, score the rest on all (same choice as exhaustive, a few times faster); False = exhaustive
greedy_margin = 4.0  # racing's confidence: a filter is dropped when its paired loss difference to the cut is below 0 by this many standard errors
greedy_candidates = None  # score only this many filters per greedy step, those with the highest first-order (Taylor) score given the chosen ones; None = all
ranking_precision = "fp32"  # loss and greedy rankings on a GPU: "fp32" (TF32 allowed), or "bf16" where a check at the first site shows the same top-20% sets (else fp32); the CPU is fp32
random_repeats = 10  # independent random filter orders (the control lesions)
rank_images = 256  # training images per task used to rank filters (never the test images)
refit_readout = False  # also score every lesion by linear readouts refitted to the lesioned features (into refit_readout/; about as long again as the sweep's lesions): what the filters carry for each task, where two heads of one task cannot differ, not only what each head reads
readout_images = 500  # training images per task the refitted readouts are fitted on
fixed_readout = True  # also score every lesion by linear readouts fitted once to the intact network's features of held-out test images (10 folds, each read by the readout fitted on the other nine; into fixed_readout/; about half as long again as the lesions through the heads): the verdict asks a site to dissociate through both, which two heads of one task do not
localiser_fdr = 0.05  # the localiser ranking: Welch's t of each filter, a task's images against the others', selective where Benjamini-Yekutieli FDR passes at this rate; its selective set is also lesioned exactly, beside random sets of its size
mask_steps = 100  # the mask ranking: Adam steps of a sigmoid gate per filter learned on frozen weights (the task's ranking images)
mask_l1 = 1.0  # the mask ranking: weight of the L1 pull toward closing gates (x the mean gate, beside the task's cross-entropy)
ranking_reliability = True  # also rank on each half of the ranking images and report how well the halves agree (costs as much again as ranking)
verdict_rankings = None  # the rankings that decide the verdict; None = the importance rankings run (loss, greedy, taylor, mask); naming activation or localiser widens the family on purpose (the report says so)
lesion_layers = None  # sites to lesion, as depths or module paths; None = every site
lesion_mode = "zero"  # "zero" silences filters; "mean" holds them at their mean activation
lesion_keep_only = False  # silence every filter except the selected ones instead
lesion_per_class = False  # also write per-class accuracy of every lesion (lesion_per_class.csv)
subgroups = None  # a CSV of test images (columns task, image = its position among the task's test images, group), e.g. by age or race: every lesion's accuracy per group in lesion_subgroups.csv; None = none
probes = []  # behavioural probes after the sweep, at its headline fraction (probes.csv): "inversion" (each task upright vs upside down, intact and lesioned), "transfer" (a linear probe of probe_data's held-out task on the trunk features, under every lesion)
probe_data = None  # the transfer probe's held-out task: a class-folder tree, a CIFAR-10 root, a cache folder or 'demo:objects'
gradcam_site = None  # site whose output Grad-CAM reads (a module path); None = the deepest with 4x4 positions
stimulus_steps = 200  # gradient-ascent steps of each synthetic preferred stimulus
stages = ["train", "lesion", "figures"]  # which parts of the pipeline to run
match_accuracy = False  # also score every lesion on test images where the tasks' intact accuracies are equal (Dobs et al. 2022)

if __name__ == "__main__":
    from dualtask.experiment.experiment import main

    main(globals())
