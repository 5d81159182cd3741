"""Lesion sites of any network, read from its traced graph (torch.fx, through torchvision's feature-extraction
tracer), and the suffix-only runner built from the same graph: the network up to a site once per image batch, the
rest once per lesion.

A site is a value the forward pass computes once, so a lesion silences one place:

- a *block's output*: a block is a submodule whose forward pass merges paths (a residual add, a concatenation, a
  gating product: ResNet's bottlenecks, ConvNeXt's blocks, MobileNet's and EfficientNet's inverted residuals,
  DenseNet's dense layers, GoogLeNet's inception modules, a pair of task branches concatenated) and that is not
  itself a sequence of such modules (a `nn.Sequential` / `ModuleList` / `ModuleDict`, or a module that strings two
  or more merging parts together without merging their outputs itself, such as a whole ResNet); its output is the
  one value of its call that the rest of the network reads;
- outside blocks, the output of each *non-linearity* (ReLU, GELU, SiLU, Hardswish, ...: a module or a function)
  whose value is a feature map (N, C, H, W): VGG's and AlexNet's ReLUs, a stem's activation.

Each call is its own node: a non-linearity module called twice gives two sites (`relu`, `relu_1`), and a block
called more than once is refused (its calls' values are not told apart). A site is named by the outermost module
whose single output it is (VGG's `features.1`, a bottleneck's `layer1.0`), else by its node's qualified name.

`find_sites` lists them; `GraphRunner` runs a network around one of them. No training code or data here.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from dualtask.core.common import UsageError

NONLINEAR_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.PReLU,
                     nn.SELU, nn.CELU)
NONLINEAR_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu,
                       F.elu, F.mish, F.selu, F.celu}
NONLINEAR_METHODS = {"relu", "relu_"}
MERGES = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul, torch.cat, torch.concat}
MERGE_METHODS = {"add", "add_", "mul", "mul_"}
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class GraphSite:
    name: str  # the module path whose single output it is, else the node's qualified name
    node: str  # the fx node's name in the traced graph
    n_filters: int  # channels of its feature map
    depth: int  # 0 = first site
    kind: str  # "block" or "nonlinearity"
    module: str | None  # the module whose output it is, called once (a forward hook there sees the same value)


def _tracer():
    """torchvision's NodePathTracer (qualified node names, `layer1.0.relu_1`) that also records how often each
    module is called and, for each node, the modules (path, call number) whose calls it lies in."""
    from torchvision.models.feature_extraction import NodePathTracer

    class CallTracer(NodePathTracer):
        def __init__(self):
            super().__init__()
            self.calls, self.stack, self.node_stack = {}, [], {}

        def call_module(self, m, forward, args, kwargs):
            path = self.path_of_module(m)
            self.calls[path] = self.calls.get(path, 0) + 1
            self.stack.append((path, self.calls[path]))
            try:
                return super().call_module(m, forward, args, kwargs)
            finally:
                self.stack.pop()

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
            self.node_stack[proxy.node] = tuple(self.stack)
            return proxy

    return CallTracer()


class Traced:
    """A network traced once: its GraphModule, each node's qualified name (`layer1.0.relu_1`), the module calls
    it lies in, each module's call count, each node's output shape for an example image batch."""

    def __init__(self, model: nn.Module, image_size: int = 64, channels: int = 3):
        from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

        self.model = model
        was_training = model.training
        model.eval()
        try:
            tracer = _tracer()
            try:
                graph = tracer.trace(model)
            except Exception as exc:  # torch.fx cannot follow data-dependent Python control flow
                raise UsageError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); lesion sites need a network "
                                 f"whose forward pass has no data-dependent branches") from None
            self.gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
            self.qualname = {n.name: tracer.node_to_qualname.get(n, n.name) for n in graph.nodes}
            self.stack = {n.name: tracer.node_stack.get(n, ()) for n in graph.nodes}
            self.calls = dict(tracer.calls)
            p = next(iter(model.parameters()), None)
            device = p.device if p is not None else "cpu"
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
            # two example batches (2 images of image_size, 3 of image_size + 32): a value whose first dimension
            # follows the batch carries one entry per image, and a feature map's channels stay while its sides grow
            shapes = []
            for batch, side in ((2, image_size), (3, image_size + 32)):
                try:
                    with torch.no_grad():
                        ShapeProp(self.gm).propagate(torch.zeros(batch, channels, side, side, device=device,
                                                                 dtype=dtype))
                except Exception as exc:
                    if shapes:  # the larger probe only refines the checks
                        break
                    raise UsageError(f"image_size={image_size}: {type(model).__name__} does not run on images of "
                                     f"{image_size} px ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}); expected a size it "
                                     f"accepts") from None
                shapes.append({n.name: tuple(n.meta["tensor_meta"].shape) for n in graph.nodes
                               if isinstance(n.meta.get("tensor_meta"), TensorMetadata)})
        finally:
            model.train(was_training)
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.shape = shapes[0]
        self.other = shapes[1] if len(shapes) > 1 else None

    def batched(self, name: str) -> bool:
        """Whether a node's value is a tensor with one entry per image along its first dimension."""
        shape = self.shape.get(name)
        if not shape:
            return False
        other = self.other.get(name) if self.other is not None else None
        return shape[0] == 2 and (other is None or other[0] == 3)

    def feature_map(self, name: str) -> bool:
        """Whether a node's value is a feature map (N, C, H, W): batched, 4-D, its channels the same at both
        example sizes and its sides not (a channels-last map, (N, H, W, C), is not)."""
        shape = self.shape.get(name, ())
        if len(shape) != 4 or not self.batched(name):
            return False
        other = self.other.get(name) if self.other is not None else None
        return other is None or (other[1] == shape[1] and other[2:] != shape[2:])

    def in_scope(self, node: fx.Node, path: str, call: int | None = None) -> bool:
        """Whether the node lies in a call of the module at `path` (any call, or call number `call`)."""
        return any(p == path and (call is None or k == call) for p, k in self.stack[node.name])


def _is_merge(node: fx.Node, traced: Traced) -> bool:
    """A node that merges paths: a concatenation, or an add or product of two or more tensors (not a tensor scaled
    by a number or a parameter)."""
    tensors = [a for a in node.all_input_nodes if a.op != "get_attr" and a.name in traced.shape]
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        return True
    if node.op == "call_function" and node.target in MERGES:
        return len(tensors) >= 2
    return node.op == "call_method" and node.target in MERGE_METHODS and len(tensors) >= 2


def _is_nonlinear(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), NONLINEAR_MODULES)
    if node.op == "call_function":
        return node.target in NONLINEAR_FUNCTIONS
    return node.op == "call_method" and node.target in NONLINEAR_METHODS


def _blocks(traced: Traced) -> tuple:
    """(the module paths of the network's blocks (the module's docstring), the paths of every module whose scope
    merges paths)."""
    modules = dict(traced.model.named_modules())
    merging = {path for path in modules if path and any(
        _is_merge(n, traced) and traced.in_scope(n, path) for n in traced.nodes)}

    def merging_units(path: str, module: nn.Module) -> int:
        """How many of the module's parts merge paths, looking through containers (a stage's Sequential)."""
        count = 0
        for child, sub in module.named_children():
            sub_path = f"{path}.{child}" if path else child
            if isinstance(sub, CONTAINERS):
                count += merging_units(sub_path, sub)
            else:
                count += sub_path in merging
        return count

    own = {traced.stack[n.name][-1][0] for n in traced.nodes if traced.stack[n.name] and _is_merge(n, traced)}

    def is_sequence(path: str, module: nn.Module) -> bool:
        """A container, or a module that strings two or more merging parts together without merging their outputs
        itself (a ResNet, a stage); one that merges its parts' outputs (an inception module, a pair of branches
        concatenated) is a block."""
        return isinstance(module, CONTAINERS) or (merging_units(path, module) >= 2 and path not in own)

    found = []

    def walk(path: str, module: nn.Module) -> None:
        for child, sub in module.named_children():
            sub_path = f"{path}.{child}" if path else child
            if sub_path in merging and not is_sequence(sub_path, sub):
                found.append(sub_path)
            elif sub_path in merging or isinstance(sub, CONTAINERS) or any(True for _ in sub.children()):
                walk(sub_path, sub)

    walk("", traced.model)
    return found, merging


def _outputs_of(traced: Traced, path: str, call: int = 1) -> list:
    """The nodes of one call of a module whose values are read outside that call (its outputs)."""
    inside = [n for n in traced.nodes if traced.in_scope(n, path, call) and n.op != "get_attr"]
    names = {n.name for n in inside}
    return [n for n in inside if any(u.name not in names for u in n.users)]


def _owner(traced: Traced, node: fx.Node, modules: dict) -> str | None:
    """The module, called once, whose single output the node is: the innermost such module that has children
    (MobileNet's `features.0`, a Conv2dNormActivation), else the leaf module itself (VGG's `features.1`, a ReLU)."""
    owners = [path for path, _ in traced.stack[node.name] if traced.calls.get(path) == 1 and
              [n.name for n in _outputs_of(traced, path)] == [node.name]]
    composite = [p for p in owners if any(True for _ in modules[p].children())]
    return composite[-1] if composite else (owners[-1] if owners else None)


def clean_cut(traced: Traced, node: fx.Node) -> bool:
    """Whether the network can be cut after `node`: every value the rest reads from before the cut holds one entry
    per image (a number, such as the batch size, or a tensor without a batch dimension cannot be stacked per
    lesion). A site whose cut is not clean is left out."""
    i = traced.index[node.name]
    after = {n.name for n in traced.nodes[i + 1:]}
    carried = [n for n in traced.nodes[:i + 1] if n.op not in ("get_attr", "output") and
               any(u.name in after for u in n.users)]
    return all(traced.batched(n.name) for n in carried)


def find_sites(model: nn.Module, image_size: int = 64, traced: Traced | None = None) -> list:
    """The network's lesion sites (the module's docstring) in the order the forward pass computes them."""
    traced = traced or Traced(model, image_size)
    modules = dict(model.named_modules())
    blocks, merging_paths = _blocks(traced)
    chosen = {}
    for path in blocks:
        if traced.calls.get(path, 0) > 1:
            raise UsageError(f"the block {path!r} ({type(modules[path]).__name__}) is called {traced.calls[path]} "
                             f"times in one forward pass: a lesion there would silence every call at once; lesion "
                             f"sites need modules called once (wrap each call in its own module)")
        outs = _outputs_of(traced, path)
        if len(outs) == 1 and traced.feature_map(outs[0].name) and clean_cut(traced, outs[0]):
            same = [p for p, _ in traced.stack[outs[0].name] if p.startswith(path) and p in merging_paths and
                    not isinstance(modules[p], CONTAINERS) and traced.calls.get(p) == 1 and
                    [n.name for n in _outputs_of(traced, p)] == [outs[0].name]]
            chosen[outs[0].name] = ("block", same[-1] if same else path)  # a one-block stage: named by its block
    in_block = {n.name for n in traced.nodes for path in blocks if traced.in_scope(n, path)}
    for n in traced.nodes:
        if n.name in in_block or not _is_nonlinear(n, modules) or not traced.feature_map(n.name) or not n.users \
                or not clean_cut(traced, n):
            continue
        chosen[n.name] = ("nonlinearity", _owner(traced, n, modules))
    sites = []
    for node in sorted(chosen, key=traced.index.get):
        kind, module = chosen[node]
        name = module if module else traced.qualname[node]
        sites.append(GraphSite(name=name, node=node, n_filters=int(traced.shape[node][1]), depth=len(sites),
                               kind=kind, module=module))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):  # a module's path named two values: fall back to the nodes' own names
        for s in sites:
            s.name = traced.qualname[s.node]
    return sites


def _copy(graph: fx.Graph, nodes: list, env: dict) -> None:
    for n in nodes:
        env[n.name] = graph.node_copy(n, lambda a: env[a.name])


class GraphRunner:
    """A traced network cut at one site: `prefix(x)` runs it up to the site once, returning every value the rest
    reads (the site's and any earlier one a skip connection carries past it); `suffix(values, transform, m)` runs
    the rest on M lesions at once: each value repeated M times along the batch, `transform` applied to the site's.

    outputs: the nodes whose values the suffix returns ({qualified name: value}); default the network's output.
    `stacks` is False where the rest reads a value from before the cut that is not a tensor with one entry per
    image (find_sites leaves such sites out: see clean_cut); then only m=1 is exact."""

    def __init__(self, traced: Traced, site: GraphSite, outputs: list | None = None):
        self.traced, self.site = traced, site
        nodes = traced.nodes
        cut = traced.index[site.node] + 1
        before, after = nodes[:cut], nodes[cut:]
        after_names = {n.name for n in after}
        by_qualname = {traced.qualname[n.name]: n for n in nodes}
        wanted = [by_qualname[o] if o in by_qualname else _unknown(o, by_qualname) for o in outputs] if outputs \
            else None
        if wanted and any(traced.index[w.name] < cut - 1 for w in wanted):
            early = [traced.qualname[w.name] for w in wanted if traced.index[w.name] < cut - 1]
            raise UsageError(f"outputs {early} come before the lesion site {site.name!r}: a lesion there cannot "
                             f"change them")
        read_after = [n for n in before if n.op != "output" and
                      (any(u.name in after_names for u in n.users) or (wanted and n in wanted))]
        self.frontier = [n for n in read_after if n.op != "get_attr"]  # parameters are read, not carried
        constants = [n for n in read_after if n.op == "get_attr"]
        self.frontier_names = [n.name for n in self.frontier]
        prefix = fx.Graph()
        env = {}
        _copy(prefix, [n for n in before if n.op != "output"], env)
        prefix.output(tuple(env[n.name] for n in self.frontier))
        self.prefix_module = fx.GraphModule(traced.gm, prefix)
        suffix = fx.Graph()
        env = {n.name: suffix.placeholder(f"in_{n.name}") for n in self.frontier}
        body = constants + [n for n in after if n.op != "output"]
        _copy(suffix, body, env)
        if wanted:
            self.output_names = [traced.qualname[w.name] for w in wanted]
            suffix.output(tuple(env[w.name] for w in wanted))
        else:
            (out,) = [n for n in after if n.op == "output"]
            self.output_names = None
            suffix.output(fx.node.map_arg(out.args[0], lambda a: env[a.name]))
        self.suffix_module = fx.GraphModule(traced.gm, suffix)
        self.stacks = all(n.name in traced.shape for n in self.frontier)

    def prefix(self, x: torch.Tensor) -> tuple:
        return self.prefix_module(x)

    def suffix(self, values: tuple, transform=None, m: int = 1):
        """The rest of the network on `values` (prefix's), each tensor repeated M times along the batch and the
        site's passed through `transform` (None: unchanged): its output, or {qualified name: value} of `outputs`."""
        site = self.frontier_names.index(self.site.node)
        args = []
        for k, v in enumerate(values):
            if isinstance(v, torch.Tensor) and m > 1:
                v = v.repeat(m, *([1] * (v.ndim - 1)))
            if k == site and transform is not None:
                v = transform(v)
            args.append(v)
        out = self.suffix_module(*args)
        return dict(zip(self.output_names, out)) if self.output_names else out


def _unknown(name: str, known: dict, setting: str = "outputs"):
    raise UsageError(f"{setting}={name!r}: not a node of the traced network; expected one of its nodes, e.g. "
                     f"{', '.join(list(known)[-6:])}")


def classifier_input(traced: Traced) -> str:
    """The qualified name of the node whose value the network's last linear layer reads (the input of its
    classifier: the features linear readouts are fitted to by default)."""
    modules = dict(traced.model.named_modules())
    linear = [n for n in traced.nodes if (n.op == "call_module" and isinstance(modules.get(str(n.target)), nn.Linear))
              or (n.op == "call_function" and n.target is F.linear)]
    if not linear:
        raise UsageError(f"readout_layer=None: {type(traced.model).__name__} has no linear layer whose input could be "
                         f"read; expected readout_layer to name a node of its traced graph")
    arg = linear[-1].args[0]
    while arg.op == "call_module" and isinstance(modules.get(str(arg.target)), (nn.Dropout, nn.Identity)):
        (arg,) = arg.all_input_nodes  # the same values in evaluation
    return traced.qualname[arg.name]


# ----------------------------------------------------------------------------------------------------------
# a traced network as a trunk the lesion engine runs


TAPS = "lesion_taps"  # the submodule holding one nn.Identity per site, called on the site's value


class GraphTrunk(nn.Module):
    """A network traced and cut at its readout layer (default: its classifier's input), returning that layer's
    values flattened (B, width); after each lesion site an nn.Identity tap (`lesion_taps.<k>`) is called on the
    site's value, so every site is a module called once (forward hooks, `ablate`, activations work as on the
    four backbones). `sites()` lists them; `runner(site)` is the suffix-only runner around one, built from this
    graph, its prefix values packed into one tensor (B, n) where a skip connection carries more than the site's."""

    def __init__(self, model: nn.Module, image_size: int = 64, readout: str | None = None):
        super().__init__()
        traced = Traced(model, image_size)
        found = find_sites(model, traced=traced)
        readout = readout or classifier_input(traced)
        by_qualname = {traced.qualname[n.name]: n for n in traced.nodes}
        if readout not in by_qualname:
            _unknown(readout, by_qualname, "readout_layer")
        if not traced.batched(by_qualname[readout].name):
            raise UsageError(f"readout_layer={readout!r}: its value is not a tensor with one entry per image; "
                             f"expected a layer of the network's features")
        end = traced.index[by_qualname[readout].name]
        if not found:
            raise UsageError(f"{type(model).__name__} has no lesion site: no block output or non-linearity whose "
                             f"value is a feature map (N, C, H, W) with one entry per image (a vision transformer's "
                             f"tokens are not filters)")
        found = [s for s in found if traced.index[s.node] < end]
        if not found:
            raise UsageError(f"readout_layer={readout!r}: no lesion site comes before it; expected a later layer")
        gm = traced.gm
        taps = nn.Module()
        for k in range(len(found)):
            taps.add_module(str(k), nn.Identity())
        gm.add_submodule(TAPS, taps)
        graph, env = fx.Graph(), {}
        site_of = {s.node: k for k, s in enumerate(found)}
        for n in traced.nodes[:end + 1]:
            env[n.name] = graph.node_copy(n, lambda a: env[a.name])
            if n.name in site_of:
                env[n.name] = graph.call_module(f"{TAPS}.{site_of[n.name]}", (env[n.name],))
        graph.output(graph.call_function(torch.flatten, (env[by_qualname[readout].name], 1)))
        # no dead-code elimination: torch.fx counts in-place tensor methods as pure, and removing one whose result
        # is not read would change what the network computes
        self.net = fx.GraphModule(gm, graph, type(model).__name__)
        self.readout = readout
        self.site_names = [s.name for s in found]
        self.image_size = image_size
        self._traced, self._runners = None, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def __getstate__(self):  # a copy traces itself again when asked (a traced graph is deep to copy)
        return dict(super().__getstate__(), _traced=None, _runners={})

    @property
    def width(self) -> int:
        return int(self.traced.shape[self.traced.nodes[-2].name][1])

    @property
    def traced(self) -> Traced:
        if self._traced is None:  # the tapped network traced again: its taps are the sites' nodes
            self._traced = Traced(self.net, self.image_size)
        return self._traced

    def _site_shapes(self) -> list:
        """[(site name, tap path, shape of its value (N, C, H, W) at image_size)] in depth order."""
        node_of = {str(n.target): n.name for n in self.traced.nodes if n.op == "call_module"}
        return [(name, f"{TAPS}.{k}", self.traced.shape[node_of[f"{TAPS}.{k}"]])
                for k, name in enumerate(self.site_names)]

    def sites(self) -> list:
        """[(site name, tap module, filters)] in depth order."""
        return [(name, self.net.get_submodule(tap), int(shape[1])) for name, tap, shape in self._site_shapes()]

    def site_sizes(self) -> list:
        """[(site name, (height, width) of its feature map at image_size)] in depth order."""
        return [(name, tuple(shape[2:])) for name, _, shape in self._site_shapes()]

    def runner(self, tap: nn.Module) -> PackedRunner:
        """The suffix-only runner around a site (its tap), built once per site: the sweep, the rankings and the
        readouts each ask for it."""
        path = next(p for p, m in self.net.named_modules() if m is tap)
        if path not in self._runners:
            self._runners[path] = self._runner(path)
        return self._runners[path]

    def _runner(self, path: str) -> PackedRunner:
        node = next(n for n in self.traced.nodes if n.op == "call_module" and str(n.target) == path)
        site = GraphSite(name=path, node=node.name, n_filters=int(self.traced.shape[node.name][1]), depth=0,
                         kind="tap", module=path)
        return PackedRunner(self.traced, site)


class PackedRunner(GraphRunner):
    """A GraphRunner whose prefix values travel as one tensor (the engine caches one per image batch): the site's
    value itself where the rest of the network reads nothing else from before the cut, else every value flattened
    and concatenated (B, n), unpacked before the suffix runs."""

    def __init__(self, traced: Traced, site: GraphSite):
        super().__init__(traced, site)
        if not self.stacks:
            raise UsageError(f"the network reads a value that is not a tensor (e.g. the batch size) across the "
                             f"lesion site {site.name!r}: it cannot be cut there")
        self.shapes = [traced.shape[n.name][1:] for n in self.frontier]
        self.alone = self.frontier_names == [site.node]

    def pack(self, values: tuple) -> torch.Tensor:
        return values[0] if self.alone else torch.cat([v.flatten(1) for v in values], 1)

    def unpack(self, packed: torch.Tensor) -> tuple:
        if self.alone:
            return (packed,)
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        return tuple(p.reshape(p.shape[0], *s) for p, s in zip(packed.split(sizes, 1), self.shapes))

    def packed_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.pack(self.prefix(x))

    def packed_suffix(self, packed: torch.Tensor, transform) -> torch.Tensor:
        """The readout layer's values (B, width) with `transform` applied to the site's value (its batch already
        holds every lesion's copy)."""
        return self.suffix(self.unpack(packed), transform, 1)
