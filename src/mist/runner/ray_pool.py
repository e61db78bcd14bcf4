"""Images spread over a Ray cluster (`mist serve --ray`, `mist protect --ray`; pip install 'mist-protect[ray]').

`RayModels` stands in for the job runner's `ModelCache`: the runner still does every check, resume and output write
where it runs (the head, beside the data), and hands the attack of each image to a pool of Ray actors, one per GPU (or
per unit of another resource), each loading the model once and keeping it. An actor whose process dies is restarted
by Ray and its image retried (`MAX_TASK_RETRIES`), on the same node or another; outputs are written once, by the
runner, from the result that arrives, so a retry never duplicates or loses an output. Whether the workers' model can
run a job's settings (`RayModels.refusal`, `RayModels.side_multiple`) is asked of the first worker's model cache, which
tells it from the model's files, so a Ray server refuses at submission what a server with its own model refuses.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from mist.engine.config import ProtectConfig
from mist.engine.pipeline import Progress, ProtectedImage

MAX_TASK_RETRIES = 3  # an image that kills its worker this many times fails instead of looping
ANSWERING = "answering"  # the actors' concurrency group for questions about settings: answered beside an image
MAX_ANSWERS = 512  # answers the pool remembers (the oldest is forgotten first): clients choose the settings


@dataclass(frozen=True)
class Setup:
    """What every image of a run shares: the settings, the files they name (mask excepted: each image's mask travels
    with it) as bytes, and the attack batch size."""

    config: ProtectConfig
    files: dict[str, bytes]
    batch_size: int


@dataclass(frozen=True)
class _Answer:
    """A worker's answer to a question about a job's settings: `value`, or the `problem` that kept its model from
    answering (the model named by its file or folder name); `missing`: the problem is that the worker has no model."""

    value: Any = None
    problem: str | None = None
    missing: bool = False

    def get(self) -> Any:
        """The value; raises ModelNotFoundError or ValueError with the problem, as the worker's model cache did."""
        if self.problem is None:
            return self.value
        from mist.models import ModelNotFoundError

        raise (ModelNotFoundError if self.missing else ValueError)(self.problem)


class _ProtectActor:
    """One model on one device of one node, kept between images."""

    def __init__(self, model: str | None, device: str | None, low_memory: bool | None) -> None:
        from mist.runner.jobs import ModelCache

        self.models = ModelCache(model, device, low_memory)
        self._setup_key: tuple[Any, ...] | None = None
        self._config: ProtectConfig | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="mist-ray-")

    def describe(self) -> dict[str, Any]:
        from mist.runner.model_identity import ModelIdentity

        identity = ModelIdentity(self.models.where())
        return {"name": identity.name, "sha256": identity.sha256, "device": str(self.models.device())}

    def precision(self, precision: str) -> str:
        return self.models.precision(precision)

    def answer(self, question: str, config: ProtectConfig) -> _Answer:
        """This worker's model cache's `refusal` or `side_multiple` (the `question`) for `config`, told from its
        model's files without loading it; a model it cannot find or read gives its problem instead."""
        from mist.models import ModelNotFoundError
        from mist.runner.jobs import without_model_path

        ask = {"refusal": self.models.refusal, "side_multiple": self.models.side_multiple}[question]
        try:
            return _Answer(ask(config))
        except (OSError, ValueError) as exc:  # ModelNotFoundError is an OSError
            return _Answer(problem=without_model_path(str(exc), self.models),
                           missing=isinstance(exc, ModelNotFoundError))

    def _protector(self, setup: Setup) -> Any:
        """The Protector for `setup`, its files written here. Every call carries its setup, so an actor Ray restarts
        after its process died serves the retried image without being told anything else."""
        key = (setup.config.to_json(), tuple((name, hash(data)) for name, data in sorted(setup.files.items())),
               setup.batch_size)
        if key != self._setup_key:
            local = {}
            for name, data in setup.files.items():
                path = Path(self._folder.name) / name
                path.write_bytes(data)
                local[name] = path
            self._config, self._setup_key = setup.config.but(mask=None, **local), key
        assert self._config is not None
        return self.models.protector(self._config, batch_size=setup.batch_size)

    def prepare(self, setup: Setup) -> tuple[str, str, bool, list[str]]:
        """Load the model (once) and the ensemble's members (once per process, `mist.engine.ensemble`); returns the
        algorithm, the precision, whether the weights are random and the ensemble's member names (the worker's model
        first; empty without `against`), as outputs record them."""
        protector = self._protector(setup)
        return (protector.method.algorithm(), protector.precision, protector.model.random_weights,
                list(protector.ensemble))

    def protect(self, setup: Setup, picture: Any, mask: Any) -> ProtectedImage:
        return self._protector(setup).protect_many([picture], [mask])[0]


@dataclass(frozen=True)
class _RemoteMethod:
    algorithm_text: str

    def algorithm(self) -> str:
        return self.algorithm_text


@dataclass(frozen=True)
class _RemoteModel:
    random_weights: bool


class RemoteProtector:
    """What the job runner needs of a Protector, with the attacks done by the pool's actors, one image each."""

    def __init__(self, actors: list[Any], setup: Any, config: ProtectConfig, algorithm: str, precision: str,
                 random_weights: bool, ensemble: list[str]) -> None:
        self.ensemble = ensemble  # the members' names as the first worker gave them (the runner records their losses)
        self.actors = actors
        self.setup = setup  # the Setup, in Ray's object store
        self.config = config
        self.method = _RemoteMethod(algorithm)
        self.precision = precision
        self.model = _RemoteModel(random_weights)

    def protect_many(self, pictures: Sequence[Any], masks: Sequence[Any] | None = None,
                     callback: Callable[[Progress], None] | None = None) -> list[ProtectedImage | Exception]:
        """Each image on its own actor (round robin); an image that failed gives its exception in its place. The
        callback hears each image as it finishes (its last step), and may raise to stop the rest."""
        import ray

        masks = list(masks) if masks is not None else [None] * len(pictures)
        pending = {self.actors[n % len(self.actors)].protect.remote(self.setup, picture, mask): n
                   for n, (picture, mask) in enumerate(zip(pictures, masks, strict=True))}
        results: list[ProtectedImage | Exception | None] = [None] * len(pictures)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    results[index] = RuntimeError(_first_line(exc))
                    continue
                results[index] = result
                if callback is not None:
                    steps = self.config.steps
                    callback(Progress(steps, steps, 0, 1, (index,), result.end.get("objective", 0.0),
                                      {k: v for k, v in result.end.items() if k != "objective"}))
        finally:
            for ref in pending:
                ray.cancel(ref)
        return results  # type: ignore[return-value]


@dataclass(eq=False)
class RayModels:
    """The job runner's model source on a Ray cluster at `address` ("auto", "HOST:PORT"): one actor per unit of
    `resource` ("GPU", or a custom resource each worker node declares), created on first use; `model`, `device_name`
    and `low_memory` as each worker opens its model; `workers`: how many actors (default: one per unit)."""

    compile: ClassVar[bool] = False  # the workers run the networks uncompiled (`mist protect` refuses --compile)
    # no server-wide text encoder files (`ModelCache.text_encoders`): `open_models` refuses them with a cluster
    text_encoders: ClassVar[tuple[str, ...]] = ()

    address: str
    model: str | None = None
    device_name: str | None = None
    low_memory: bool | None = None
    resource: str = "GPU"
    workers: int | None = None
    attack_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _actors: list[Any] | None = field(default=None, init=False)
    _description: dict[str, Any] | None = field(default=None, init=False)
    _answers: dict[tuple[str, ProtectConfig], Any] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def actors(self) -> list[Any]:
        with self._lock:
            if self._actors is None:
                self._actors = self._start()
            return self._actors

    def _start(self) -> list[Any]:
        try:
            import ray
        except ImportError:
            raise ValueError("--ray: Ray is not installed: pip install 'mist-protect[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level="warning", log_to_driver=False)
        available = int(ray.cluster_resources().get(self.resource, 0))
        count = min(available, self.workers) if self.workers else available
        if count < 1:
            raise ValueError(f"--ray: the cluster at {self.address} has no {self.resource!r} resource to run on")
        placement = {"num_gpus": 1} if self.resource == "GPU" else {"resources": {self.resource: 1}}
        actor = ray.remote(concurrency_groups={ANSWERING: 1})(_ProtectActor).options(
            max_restarts=-1, max_task_retries=MAX_TASK_RETRIES, **placement)
        return [actor.remote(self.model, self.device_name, self.low_memory) for _ in range(count)]

    @property
    def images_at_once(self) -> int:
        return len(self.actors())

    def describe(self) -> dict[str, Any]:
        """The model and device as the first worker sees them."""
        import ray

        if self._description is None:
            self._description = ray.get(self.actors()[0].describe.remote())
        return self._description

    def where(self) -> str:
        return self.model or "the workers' default model"

    def identity(self) -> Any:
        description = self.describe()
        return _Identity(description["name"], description["sha256"])

    def refusal(self, config: ProtectConfig) -> str | None:
        """Why the workers' model cannot run `config`, as `ModelCache.refusal` tells it on a worker (the model named by
        its file or folder name), or None; raises as it does. Asked of the first worker (see `_ask`)."""
        return self._ask("refusal", config)

    def side_multiple(self, config: ProtectConfig) -> tuple[int, str]:
        """The multiple of pixels each processed side must be for the workers' model, and why, as
        `ModelCache.side_multiple` tells it on a worker; raises as it does. Asked of the first worker (see `_ask`)."""
        return self._ask("side_multiple", config)

    def _ask(self, question: str, config: ProtectConfig) -> Any:
        """A worker's answer to `question` about `config`, asked of the first worker that answers (its model cache
        tells the family from the files, without loading the model; it answers beside a running image). Answers are
        remembered here, so a restarted worker changes nothing, except those about `against` models or text encoder
        files (memory available now, files that may appear), which are asked each time. Raises ModelNotFoundError or
        ValueError as the worker's model cache did, or ValueError when no worker answers."""
        key = (question, config)
        with self._lock:
            if key in self._answers:
                return self._answers[key]
        value = self._worker_answer(question, config).get()
        if not (config.against or config.text_encoders):
            with self._lock:
                if len(self._answers) >= MAX_ANSWERS:
                    del self._answers[next(iter(self._answers))]
                self._answers[key] = value
        return value

    def _worker_answer(self, question: str, config: ProtectConfig) -> _Answer:
        """The first worker's answer, or the next one's where a worker cannot answer (Ray gave up on it)."""
        import ray

        failure = ""
        for actor in self.actors():
            try:
                return ray.get(actor.answer.options(concurrency_group=ANSWERING).remote(question, config))
            except ray.exceptions.RayError as exc:
                failure = _first_line(exc)
        raise ValueError(f"--ray: no worker answered whether its model runs these settings: {failure}")

    def precision(self, precision: str) -> str:
        import ray

        return ray.get(self.actors()[0].precision.remote(precision))

    def protector(self, config: ProtectConfig, *, batch_size: int = 1,
                  on_load: Callable[[str, Any], None] | None = None) -> RemoteProtector:
        import ray

        if on_load is not None:
            on_load(self.where(), f"{len(self.actors())} Ray worker(s)")
        files = {name: path.read_bytes() for name, path in config.files().items() if name != "mask"}
        setup = ray.put(Setup(config, files, batch_size))
        answers = ray.get([actor.prepare.remote(setup) for actor in self.actors()])
        return RemoteProtector(self.actors(), setup, config, *answers[0])


@dataclass(frozen=True)
class _Identity:
    name: str
    sha256: str | None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:300] if text else type(exc).__name__
