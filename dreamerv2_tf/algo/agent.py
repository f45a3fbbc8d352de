"""The agent: world model plus actor-critic, with compiled `train` and `policy` graphs."""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from dreamerv2_tf.algo.behavior import ActorCritic
from dreamerv2_tf.algo.explore import EXPLORERS
from dreamerv2_tf.algo.replicas import first_replica, replicated, split_batch
from dreamerv2_tf.algo.world_model import WorldModel
from dreamerv2_tf.config import CHOICES

PRECISIONS = CHOICES["precision"]
POLICY_MODES = ("train", "eval", "explore", "random")
EXPL_BEHAVIORS = CHOICES["expl_behavior"]
# Keys of an episode that are not model inputs.
NON_OBS_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal", "discount")


def resolve_precision(precision: str) -> str:
    """`auto` is mixed float16 on a GPU with tensor cores (compute capability >= 7), else float32."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision != "auto":
        return precision
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0))
        if capability and capability[0] >= 7:
            return "16"
    return "32"


def resolve_jit(jit: str | bool) -> bool:
    """Whether the train step is XLA-compiled: `auto` is on with a GPU visible, off on CPUs (where XLA
    measured slower; see docs/performance.md)."""
    text = str(jit).lower()
    if text not in ("auto", "true", "false"):
        raise ValueError(f"jit must be auto, true or false, got {jit!r}")
    if text == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return text == "true"


def set_precision(precision: str) -> str:
    """Set the global Keras dtype policy; must run before any layer is built."""
    precision = resolve_precision(precision)
    policy = {"32": "float32", "16": "mixed_float16", "bf16": "mixed_bfloat16"}[precision]
    keras.mixed_precision.set_global_policy(policy)
    return precision


def model_obs_shapes(obs_space: Mapping) -> dict[str, tuple]:
    """Observation keys the model sees: everything but bookkeeping and `log_` keys."""
    return {k: tuple(v.shape) for k, v in obs_space.items()
            if k not in NON_OBS_KEYS and not k.startswith("log_")}


def action_spec(act_space: Mapping) -> tuple[int, bool]:
    """(action vector size, discrete?) from a gymnasium Discrete or Box `action` space."""
    space = act_space["action"]
    if hasattr(space, "n"):
        return int(space.n), True
    return int(np.prod(space.shape)), False


class Agent(tf.Module):
    """DreamerV2. Build it after `set_precision`; `train` and `policy` are tf.function graphs.

    Built inside `strategy.scope()`, its variables are mirrored and `train` runs data-parallel on
    the strategy's replicas (see replicas.py).
    """

    def __init__(self, obs_space: Mapping, act_space: Mapping, config, precision: str | None = None):
        super().__init__(name="agent")
        self.precision = resolve_precision(precision or config.precision)
        mixed16 = self.precision == "16"
        if config.expl_behavior not in EXPL_BEHAVIORS:
            raise ValueError(f"expl_behavior must be one of {', '.join(EXPL_BEHAVIORS)}, "
                             f"got '{config.expl_behavior}'")
        self.obs_shapes = model_obs_shapes(obs_space)
        self.act_dim, self.discrete = action_spec(act_space)
        self.expl_behavior = config.expl_behavior
        self.train_behavior = bool(config.train_behavior)
        self.expl_noise, self.eval_noise = config.expl_noise, config.eval_noise
        self.eval_state_mean = bool(config.eval_state_mean)
        self.video_keys = tuple(k for k in config.log_keys_video if len(self.obs_shapes.get(k, ())) == 3)
        self.strategy = tf.distribute.get_strategy()  # the strategy whose scope the agent is built in
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="train_updates",
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # The agent-step counter that schedules follow; the training loop sets it before each update.
        self.env_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="env_step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.wm = WorldModel(self.obs_shapes, self.act_dim, config, mixed16)
        self.ac = ActorCritic(self.wm.rssm.feat_size, self.act_dim, self.discrete, config, mixed16,
                              env_step=self.env_step)
        self.wm.build()
        self.ac.build()
        # plan2explore / model_loss: an exploration actor-critic with its own reward, used by mode 'explore'.
        self.explorer = None
        if self.expl_behavior in EXPLORERS:
            self.explorer = EXPLORERS[self.expl_behavior](self.wm, self.act_dim, self.discrete, config, mixed16,
                                                          env_step=self.env_step)
            self.explorer.build()
        self._train = replicated(self._train_step, self.strategy, jit=resolve_jit(config.jit))
        self._report = tf.function(self._report_step, autograph=False)
        self._policies = PolicyGraphs(self._policy_step)
        self._seeds = np.random.default_rng(config.seed)  # keys of initial states made without a seed

    def network_variables(self) -> list:
        """The weights of the networks: world model, actor, critic and slow critic.

        Keras 3 variables are not tf.Variables, so `tf.Module.trainable_variables` does not list them.
        """
        variables = list(self.wm.variables_to_train) + self.ac.network_weights()
        return variables + (self.explorer.network_variables() if self.explorer else [])

    def param_counts(self) -> dict[str, int]:
        count = lambda vs: int(sum(np.prod(v.shape) for v in vs))  # noqa: E731
        counts = {"world_model": count(self.wm.variables_to_train),
                  "actor": count(self.ac.actor.trainable_variables),
                  "critic": count(self.ac.critic.trainable_variables)}
        if self.explorer:
            explorer = self.explorer
            counts[self.expl_behavior] = count(explorer.trainable_heads + explorer.ac.actor.trainable_variables
                                               + explorer.ac.critic.trainable_variables)
        return counts

    def initial_state(self, batch: int, seed: int | None = None):
        """The policy state at the start of episodes: (latent, previous action, key).

        The latent and the action are zeros. The key (int32 [2]) seeds every random draw of the policy
        steps that carry it forward: the same key and inputs give the same actions, in any process. It
        comes from `seed`, else from the agent's own seed sequence, which starts at `config.seed`.
        """
        latent = self.wm.rssm.initial(batch)
        seed = int(self._seeds.integers(2**63)) if seed is None else seed
        return latent, tf.zeros([batch, self.act_dim], tf.float32), policy_key(seed)

    def policy(self, obs: Mapping[str, np.ndarray], state=None, mode: str = "train"):
        """Act on a batch of observations [N, ...]; returns ({'action': [N, A]}, state).

        The recurrent state is carried between calls and reset where `is_first` is set.
        """
        if mode not in POLICY_MODES:
            raise ValueError(f"policy mode must be one of {', '.join(POLICY_MODES)}, got '{mode}'")
        obs = {k: tf.convert_to_tensor(obs[k]) for k in (*self.obs_shapes, "is_first")}
        if state is None:
            state = self.initial_state(int(obs["is_first"].shape[0]))
        action, state = self._policies(mode, obs, state)
        return {"action": action.numpy()}, state

    def _policy_step(self, obs, state, mode: str):
        latent, action, key = state
        # Stateless draws from the carried key: reproducible across processes and graph retraces.
        key, rssm_seed, actor_seed, noise_seed = tf.unstack(tf.random.split(key, 4))
        embed = self.wm.encoder(self.wm.preprocess(obs))
        sample = mode != "eval" or not self.eval_state_mean
        latent, _ = self.wm.rssm.obs_step(latent, action, embed, obs["is_first"], sample, seed=rssm_seed)
        feat = self.wm.rssm.get_feat(latent)
        actor = self.explorer.ac.actor if mode == "explore" and self.explorer else self.ac.actor
        dist = actor(feat)
        if mode == "eval":
            action, noise = dist.mode(), self.eval_noise
        elif mode == "random" or (mode == "explore" and self.expl_behavior == "random"):
            action, noise = self._random_action(tf.shape(feat)[0], actor_seed), 0.0
        else:
            action, noise = dist.sample(seed=actor_seed), self.expl_noise
        action = self._add_noise(tf.cast(action, tf.float32), noise, noise_seed)
        return action, (latent, action, key)

    def _random_action(self, batch, seed: tf.Tensor) -> tf.Tensor:
        if self.discrete:
            index = tf.random.stateless_uniform([batch], seed, 0, self.act_dim, tf.int32)
            return tf.one_hot(index, self.act_dim)
        return tf.random.stateless_uniform([batch, self.act_dim], seed, -1.0, 1.0)

    def _add_noise(self, action: tf.Tensor, amount: float, seed: tf.Tensor) -> tf.Tensor:
        if amount == 0:
            return action
        first, second = tf.unstack(tf.random.split(seed, 2))
        if self.discrete:
            # With probability `amount`, a uniformly random action instead.
            random = self._random_action(tf.shape(action)[0], first)
            pick = tf.random.stateless_uniform(tf.shape(action)[:1], second) < amount
            return tf.where(pick[:, None], random, action)
        return tf.clip_by_value(action + tf.random.stateless_normal(tf.shape(action), first) * amount, -1.0, 1.0)

    def train(self, data: Mapping[str, tf.Tensor], env_step: int | None = None, state=None):
        """One update of world model, actor and critic (unless train_behavior is off) on a batch [B, L, ...].

        Returns (metrics, state). `state` is the posterior at the last step of every sequence: passed to
        the next call, it is where a sequence that does not start with is_first continues from (replay
        streams, `Replay.chunks`); None starts from zeros. `env_step`, the number of agent steps so far,
        sets the clock of the schedules.

        Under a strategy, `data` is the global batch (split evenly across replicas) or already
        distributed (from `loop.distribute.distribute_dataset`); metrics are means over replicas and the
        state stays per replica.
        """
        if env_step is not None:
            self.env_step.assign(int(env_step))
        data = split_batch(self.strategy, dict(data))
        if state is None:  # zeros shaped like a carried state, so that the step is traced once
            state = self.strategy.run(lambda part: self.wm.rssm.initial(tf.shape(part["action"])[0]), args=(data,))
        return self._train(data, state)

    def _train_step(self, data, state):
        state, outputs, metrics = self.wm.train(data, state)
        if self.train_behavior:
            reward_fn = lambda seq: self.wm.heads["reward"](seq["feat"]).mode()  # noqa: E731
            metrics.update(self.ac.train(self.wm, outputs["post"], data["is_terminal"], reward_fn))
            if self.explorer:
                explore = self.explorer.train(self.wm, outputs["post"], outputs, data)
                metrics.update({f"expl_{key}": value for key, value in explore.items()})
        self.step.assign_add(1)
        return {k: tf.cast(v, tf.float32) for k, v in metrics.items()}, state

    def report(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Open-loop video predictions (truth | model | error) for each video key."""
        if not self.video_keys:
            return {}
        return self._report(dict(first_replica(self.strategy, dict(data))))

    def _report_step(self, data):
        return {f"openl_{key}": self.wm.video_pred(data, key) for key in self.video_keys}


class PolicyGraphs:
    """Concrete policy graphs by mode and input signature (dtypes and shapes past the batch), traced on
    first use. Calling a concrete function skips tf.function's argument matching (0.4 ms of a 6-ms
    step). A plain object, so that the agent's checkpoint does not track the graphs.

    The state is (latent, action, key); every tensor but the key has a batch axis."""

    def __init__(self, step):
        self.step, self.graphs = step, {}

    def __call__(self, mode: str, obs, state):
        latent, action, key = state
        batched = (obs, (latent, action))
        signature = (mode, *((t.dtype, tuple(t.shape[1:])) for t in tf.nest.flatten(batched)))
        if signature not in self.graphs:
            free_batch = lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype)  # noqa: E731
            function = tf.function(lambda obs, carried, key: self.step(obs, (*carried, key), mode), autograph=False)
            specs = (*tf.nest.map_structure(free_batch, batched), tf.TensorSpec([2], tf.int32))
            self.graphs[signature] = function.get_concrete_function(*specs)
        return self.graphs[signature](obs, (latent, action), key)


def policy_key(seed: int | tf.Tensor) -> tf.Tensor:
    """The stateless key (int32 [2]) that an integer seed stands for: its low and high 32 bits (a counter-
    based generator needs no scrambling of its key). Python ints wrap to 64 bits; tensors are int64."""
    if isinstance(seed, (int, np.integer)):
        seed = (int(seed) + 2**63) % 2**64 - 2**63
    seed = tf.convert_to_tensor(seed, tf.int64)
    low = tf.bitcast(tf.cast(tf.bitwise.bitwise_and(seed, 0xFFFFFFFF), tf.uint32), tf.int32)
    high = tf.cast(tf.bitwise.right_shift(seed, 32), tf.int32)
    return tf.stack([low, high])


def nonfinite_variables(variables) -> list[str]:
    """Paths of the variables holding NaN or inf."""
    return [getattr(variable, "path", None) or variable.name for variable in variables
            if not np.isfinite(np.asarray(variable.numpy(), np.float64)).all()]
