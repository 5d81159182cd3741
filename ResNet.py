"""Dual-task ResNet50: face identity and object category on one shared trunk, then a lesion sweep.

    python ResNet.py --face_data=demo --object_data=demo --image_size=32 --epochs=3 --device=cpu

Every setting below can be changed here or from the shell (`--name=value`); `--help` lists them.
"""
backbone = "resnet50"  # torchvision architecture: vgg16, vgg19, resnet50 or resnext50
head = "split"  # "split": one output layer per task; "joint": one softmax over all tasks' classes (Dobs et al. 2022; the original repository's 20-way layer)
branch_at = None  # None: one trunk shared by all tasks; a site depth or module path (e.g. 8): the trunk is shared up to that site, then each task trains its own copy of the rest (a branched network, as sdnn's VGG16Split); head must be "split"
init = "random"  # "random" (He / torchvision init), "imagenet" (torchvision's ImageNet weights, downloaded only when asked) or a path to a local state-dict file of the trunk
face_data = "demo"  # VGGFace2 root or cache, a folder of identity folders, or 'demo'
object_data = "demo"  # CIFAR-10 root (with cifar-10-batches-py/), a folder of class folders, or 'demo'
tasks = None  # {task: data spec} replacing the <task>_data settings, e.g. {'identity': 'demo', 'expression': 'demo'}; tasks reading the same source share its images (each image carries both labels); None = the <task>_data settings
kdef_views = ["S"]  # KDEF camera angles used: S (frontal), HL/HR (half left/right), FL/FR (full left/right)
face_crop = "boxes"  # face photographs: "boxes" (VGGFace2's loose boxes, LFW's fixed box, +30%), "detect" (OpenCV's face detector, +30%), "align" (VGGFace2's 5 landmarks), "none" (whole)
download = False  # fetch CIFAR-10 into object_data when it is missing there
image_size = 112  # both tasks are resized to image_size x image_size pixels (the reference study used 224)
max_per_class = None  # cap on images per class (identity or category); None = all
max_classes = None  # cap on classes per task (the first N by name); None = all
demo_per_class = 100  # images per class of the procedural demo set
batch_size = 128  # images per step, split evenly between the tasks
epochs = 30  # passes over the larger task's training images
optimizer = "adamw"  # "adamw" (the default recipe) or "sgd" (Nesterov momentum 0.9)
lr = None  # peak learning rate per 256 images (AdamW: scaled with the square root of batch_size/256; SGD: linearly), warm-up then cosine; None = the backbone and optimizer default (DEFAULT_LR in dualtask/training/trainer.py)
grad_clip = 0.0  # largest gradient norm per step (0 = no clipping, as torchvision's recipes: warm-up keeps early steps small)
weight_decay = None  # decay of weights (not of biases and BN parameters); None = 0.05 with AdamW (decoupled), 5e-4 with SGD (L2)
health_check = "stop"  # a run that does not learn (head at chance from epoch 3 or half of training, dead layer, exploding loss): "stop" naming the cause, or "warn"
seed = 0  # seeds data sampling, splits, initialisation, augmentation and lesion controls
device = "auto"  # 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'
compile = False  # torch.compile the model for training (CUDA, PyTorch 2)
retrain = False  # train again even when out_dir holds a finished run
out_dir = "runs/resnet50"  # where config.json, train_log.csv, checkpoint.pt, lesion_results.csv and figures/ go
lesion_fractions = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]  # fractions of a layer's filters silenced in the lesion sweep
lesion_methods = ["activation", "random"]  # rankings: activation, localiser, loss, greedy, taylor, mask, random (loss and greedy are the reference study's; costly on a CPU)
greedy_stop = 0.2  # the greedy ranking chooses filters in steps of 1.6% of a site until just past this fraction (the reference study's 0.2); greedy lesions beyond it are marked in lesion_results.csv
greedy_racing = True  # race each greedy step: drop filters confidently below the step's cut on a slice of the ranking images, score the rest on all (same choice as exhaustive, a few times faster); False = exhaustive
greedy_margin = 4.0  # racing's confidence: a filter is dropped when its paired loss difference to the cut is below 0 by this many standard errors
greedy_candidates = None  # score only this many filters per greedy step, those with the highest first-order (Taylor) score given the chosen ones; None = all
ranking_precision = "fp32"  # loss and greedy rankings on a GPU: "fp32" (TF32 allowed), or "bf16" where a check at the first site shows the same top-20% sets (else fp32); the CPU is fp32
random_repeats = None  # independent random filter orders (the control lesions); None = as many as let the rankings that decide the verdict reach a corrected p below 0.05 (K rankings: K/(R+2) < 0.05), at least 20; fewer is allowed, and the run says first what it cannot show
rank_images = 256  # training images per task used to rank filters (never the test images)
refit_readout = False  # also score every lesion by linear readouts refitted to the lesioned features (into refit_readout/; about as long again as the sweep's lesions): what the filters carry for each task, where two heads of one task cannot differ, not only what each head reads
readout_images = 500  # training images per task the refitted readouts are fitted on
fixed_readout = True  # also score every lesion by linear readouts fitted once to the intact network's features of held-out test images (10 folds, each read by the readout fitted on the other nine; into fixed_readout/; about half as long again as the lesions through the heads): the verdict asks a site to dissociate through both, which two heads of one task do not
localiser_fdr = 0.05  # the localiser ranking: Welch's t of each filter, a task's images against the others', selective where Benjamini-Yekutieli FDR passes at this rate; its selective set is also lesioned exactly, beside random sets of its size
mask_steps = 100  # the mask ranking: Adam steps of a sigmoid gate per filter learned on frozen weights (the task's ranking images)
mask_l1 = 1.0  # the mask ranking: weight of the L1 pull toward closing gates (x the mean gate, beside the task's cross-entropy)
ranking_reliability = True  # also rank on each half of the ranking images and report how well the halves agree (the loss ranking's halves come free from its per-image losses; the others cost as much again)
verdict_rankings = None  # the rankings that decide the verdict; None = the importance rankings run (loss, greedy, taylor, mask); naming activation or localiser widens the family on purpose (the report says so)
lesion_layers = None  # sites to lesion, as depths or module paths; None = every site
lesion_inner = False  # also lesion each bottleneck's inner conv outputs
lesion_mode = "zero"  # "zero" silences filters; "mean" holds them at their mean activation
lesion_keep_only = False  # silence every filter except the selected ones instead
lesion_per_class = False  # also write per-class accuracy of every lesion (lesion_per_class.csv)
subgroups = None  # a CSV of test images (columns task, image = its position among the task's test images, group), e.g. by age or race: every lesion's accuracy per group in lesion_subgroups.csv; None = none
probes = []  # behavioural probes after the sweep, at its headline fraction (probes.csv): "inversion" (each task upright vs upside down, intact and lesioned), "transfer" (a linear probe of probe_data's held-out task on the trunk features, under every lesion)
probe_data = None  # the transfer probe's held-out task: a class-folder tree, a CIFAR-10 root, a cache folder or 'demo:objects'
lesion_epochs = None  # earlier epochs whose weights are kept and swept too (into epoch_<N>/), to show when a split appears; None = the last only
gradcam_site = None  # site whose output Grad-CAM reads (a module path); None = the deepest with 4x4 positions
stimulus_steps = 200  # gradient-ascent steps of each synthetic preferred stimulus
stages = ["train", "lesion", "figures"]  # which parts of the pipeline to run
seeds = None  # an experiment's training seeds, each its own network in out_dir/seed_<N>/; None = one run of `seed` into out_dir
controls = []  # control runs of the experiment: "pseudo_task" (classes split at random into two tasks), "single_task" (one network per task), "resolution_matched" (all images at the lowest native resolution), "same_task" (the first task's images dealt to both heads: a null with a known answer)
branch_points = None  # an experiment over branch points, e.g. [None, 4, 8, 12]: one network per branch point (None = fully shared) and seed, with branching.csv (accuracy against branch depth) in out_dir; None = the networks of branch_at
match_accuracy = False  # also score every lesion on test images where the tasks' intact accuracies are equal (Dobs et al. 2022)
launcher = "local"  # an experiment's runs: "local" one after another here, "slurm" one SLURM job each (submitit), "submitit_local" as local jobs
slurm = {"timeout_min": 1440, "gpus_per_node": 1, "cpus_per_task": 8}  # submitit parameters of each job, e.g. add "slurm_partition": "gpu"

if __name__ == "__main__":
    from dualtask.experiment.experiment import main

    main(globals())
