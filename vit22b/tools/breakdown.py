"""Where a compiled program's time goes on XLA:CPU: matmuls, batched matmuls, everything else, and idle.

`python -m vit22b.tools.bench ... --breakdown` traces three more steps with jax.profiler, keeps the one with the median
span, and matches its events to the compiled program's instructions (XLA:CPU names each executed thunk after its
HLO instruction). Tracing costs a little per event, so the span can exceed the untraced step_s. Each instant
of the step is split equally among the instructions running at it, so the parts add up to the step's span even
where independent instructions overlap. An instruction counts as a matmul when it is, or fuses, a `dot`; as a
batched matmul when that dot has batch dimensions (attention's per-head products; the dense layers' dots have
none). Their GFLOP come from the dots' shapes, so GFLOP/s shows how close each class runs to the ceiling.

Dots that XLA:CPU leaves to Eigen rather than YNNPACK (a plain `dot` instruction: float32 weight gradients) run
asynchronously, and their events end at launch. Each is taken to run until the first user of its result starts
(`extend_async_dots`), an upper bound where that user also waits for something else. Only the CPU backend names
its events this way; elsewhere use XProf.
"""
import collections
import glob
import os
import re
import tempfile

import jax

# "  %name = f32[8,196]{1,0} opcode(operands), attr=..., metadata={...}" (tuple shapes in parentheses)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_DIMS = re.compile(r"^\w+\[([\d,]*)\]")


def _dims(shape):
    m = _DIMS.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _ints(attrs, key):
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text):
    """{computation: [instruction dicts]} of an HLO module's text; each instruction has name, dims (None for a
    tuple), opcode, operands (names), calls (a called computation or None), op_name and, for dots, contracting
    and batch dims of the left operand."""
    comps, current = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = current.lstrip("%")
            comps[current] = []
            continue
        m = _INSTRUCTION.match(line)
        if not m or current is None:
            continue
        name, shape, opcode, rest = m.groups()
        args = rest.split(")", 1)[0]
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        comps[current].append({
            "name": name, "dims": _dims(shape), "opcode": opcode,
            "operands": [a.strip().split()[-1].lstrip("%") for a in args.split(",") if a.strip()],
            "calls": calls.group(1) if calls else None, "op_name": op_name.group(1) if op_name else "",
            "lhs_contracting": _ints(rest, "lhs_contracting_dims"), "lhs_batch": _ints(rest, "lhs_batch_dims")})
    return comps


def matmul_flops(comps):
    """{instruction name: (flops, batched)} for every instruction that is or fuses a dot."""
    dims = {i["name"]: i["dims"] for body in comps.values() for i in body}

    def dots(body, seen):
        for i in body:
            if i["opcode"] == "dot":
                yield i
            elif i["calls"] and i["calls"] in comps and i["calls"] not in seen:
                yield from dots(comps[i["calls"]], seen | {i["calls"]})

    out = {}
    for body in comps.values():
        for i in body:
            flops, batched = 0, False
            for d in dots([i], frozenset()):
                lhs = dims.get(d["operands"][0]) if d["operands"] else None
                if d["dims"] is None or lhs is None:
                    continue
                k = 1
                for c in d["lhs_contracting"]:
                    k *= lhs[c]
                n = 1
                for x in d["dims"]:
                    n *= x
                flops += 2 * n * k
                batched |= bool(d["lhs_batch"])
            if flops:
                out[i["name"]] = (flops, batched)
    return out


def _short(op_name, differentiated=True):
    """'backward block_*/concatenate' for 'jit(step_fn)/transpose(jvp(ViT))/block_05/concatenate'. In a program
    that differentiates, what is outside jvp() is the update; in one that does not, all of it is the forward."""
    phase = ("backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name or not differentiated
             else "update")
    parts = [p for p in op_name.split("/") if p and "(" not in p]
    return f"{phase} " + re.sub(r"_\d+\b", "_*", "/".join(parts[-2:])) if parts else "unnamed"


def trace_events(run, names):
    """(start_ns, end_ns, name) of the events named in `names` while `run()` executes under jax.profiler."""
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
        return sorted((ev.start_ns, ev.end_ns, ev.name) for plane in data.planes for line in plane.lines
                      for ev in line.events if ev.name in names)


def attribute(events, classify):
    """Wall time per class: each instant between the first start and the last end is split equally among the
    events running at it ('idle' where none is). Returns ({class: seconds}, span seconds)."""
    if not events:
        raise ValueError("breakdown: the trace holds no event named after an instruction of the program "
                         "(is this the CPU backend?)")
    points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(events)]
                    + [(e, 0, i) for i, (_, e, _) in enumerate(events)])  # at a tie, ends before starts
    running, last, wall = set(), points[0][0], collections.Counter()
    for t, starts, i in points:
        dt = (t - last) / 1e9
        if running:
            for j in running:
                wall[classify(events[j][2])] += dt / len(running)
        else:
            wall["idle"] += dt
        last = t
        (running.add if starts else running.discard)(i)
    return wall, (points[-1][0] - points[0][0]) / 1e9


def extend_async_dots(events, comps, fused):
    """Let each plain `dot` event (an Eigen matmul, which XLA:CPU runs asynchronously: its event ends at launch)
    last until the first event of an instruction that uses its result starts, looking through instructions that
    leave no event (bitcasts, tuples). Without a traced user the event is left as it is."""
    users = collections.defaultdict(set)
    opcode = {}
    for c, body in comps.items():
        if c not in fused:
            for i in body:
                opcode[i["name"]] = i["opcode"]
                for o in i["operands"]:
                    users[o].add(i["name"])
    starts = collections.defaultdict(list)
    for s, _, n in events:
        starts[n].append(s)

    def traced_users(name):
        found, todo, seen = set(), list(users[name]), set()
        while todo:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            if u in starts:
                found.add(u)
            else:
                todo.extend(users[u])
        return found

    out = []
    for s, e, n in events:
        if opcode.get(n) == "dot":
            later = [t for u in traced_users(n) for t in starts[u] if t >= s]
            e = max(e, min(later)) if later else e
        out.append((s, e, n))
    return sorted(out)


def require_cpu():
    if jax.default_backend() != "cpu":
        raise ValueError(f"--breakdown reads XLA:CPU's thunk events; on {jax.default_backend()} use XProf "
                         "(jax.profiler.start_trace) instead")


def breakdown(compiled, run, top=8, traces=3):
    """Where `run()` (one execution of `compiled`) spends its time on XLA:CPU (see the module docstring), from
    the trace with the median span of `traces` traced runs: on a noisy machine one run can be much slower."""
    require_cpu()
    comps = parse_hlo(compiled.as_text())
    fused = {i["calls"] for body in comps.values() for i in body if i["opcode"] == "fusion" and i["calls"]}
    # A while loop's (or call's) own event spans its body's events: only the leaves count.
    executed = {i["name"]: i for c, body in comps.items() if c not in fused for i in body
                if i["opcode"] not in ("while", "conditional", "call")}
    flops = matmul_flops(comps)

    def op_name(i):  # a fusion XLA made up itself has no name: take the first one inside it
        inner = comps.get(i["calls"], []) if i["calls"] else []
        return i["op_name"] or next((j["op_name"] for j in inner if j["op_name"]), "")

    differentiated = any("jvp(" in i["op_name"] for i in executed.values())

    def classify(name):
        if name in flops:
            return "batched_matmul" if flops[name][1] else "matmul"
        return "other:" + _short(op_name(executed[name]), differentiated)

    traced = [extend_async_dots(trace_events(run, set(executed)), comps, fused) for _ in range(traces)]
    events, (wall, span) = sorted(((e, attribute(e, classify)) for e in traced), key=lambda t: t[1][1])[traces // 2]
    result = {"span_ms": round(span * 1e3, 1), "idle_ms": round(wall.pop("idle", 0.0) * 1e3, 1)}
    for kind in ("matmul", "batched_matmul"):
        seconds = wall.pop(kind, 0.0)
        gflop = sum(flops[n][0] for _, _, n in events if classify(n) == kind) / 1e9  # a loop body's, per trip
        result[kind] = {"ms": round(seconds * 1e3, 1), "gflop": round(gflop, 4),
                        "gflop_per_s": round(gflop / seconds, 1) if seconds else None}
    result["other_ms"] = round(sum(wall.values()) * 1e3, 1)
    result["top_other_ms"] = {k[len("other:"):]: round(v * 1e3, 1) for k, v in wall.most_common(top)}
    return result
