"""The agent: recurrent policy state, policy modes, open-loop video report, XLA and non-XLA train steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import (
    continuous_actions,
    discrete_actions,
    first_step,
    make_agent,
    obs_space,
    random_batch,
    tiny_config,
)

from dreamerv2_tf.algo.agent import POLICY_MODES, policy_key, resolve_jit, resolve_precision
from dreamerv2_tf.algo.world_model import WorldModel

IMAGE = (64, 64, 1)
SMALL = {"encoder.cnn_depth": 2, "decoder.cnn_depth": 2}


@pytest.fixture(scope="module")
def discrete_agent():
    obs, act = obs_space(IMAGE), discrete_actions(3)
    return make_agent(obs, act, SMALL), random_batch(obs, act, batch=3, length=8, seed=1)


def latent_of(state):
    latent, _, _ = state
    return {k: v.numpy() for k, v in latent.items()}


def with_key(state, seed: int):
    """The same latent and action under another key."""
    return (*state[:2], policy_key(seed))


def test_policy_carries_state_and_resets_on_is_first(discrete_agent):
    agent, data = discrete_agent
    _, state = agent.policy(first_step(data, 0), None, "eval")
    # After a reset the deterministic state is a constant; the posterior already sees the image.
    assert np.abs(np.diff(latent_of(state)["logit"], axis=0)).max() > 1e-4
    obs = first_step(data, 1)
    obs["is_first"] = np.array([True, False, False])
    _, carried = agent.policy(obs, state, "eval")
    _, fresh = agent.policy({**obs, "is_first": np.ones(3, bool)}, None, "eval")
    _, ignored = agent.policy({**obs, "is_first": np.zeros(3, bool)}, None, "eval")
    carried, fresh, ignored = latent_of(carried), latent_of(fresh), latent_of(ignored)
    for key in ("deter", "logit"):
        # Item 0 starts an episode: the carried state is dropped, as for a fresh start.
        np.testing.assert_allclose(carried[key][0], fresh[key][0], rtol=1e-5, atol=1e-6)
        # Items 1 and 2 continue: their state depends on the previous step.
        assert np.abs(carried[key][1:] - ignored[key][1:]).max() > 1e-4
    # The returned state holds the action taken, for the next step's transition.
    action, state = agent.policy(obs, state, "eval")
    np.testing.assert_array_equal(state[1].numpy(), action["action"])


def test_eval_policy_samples_latents_as_the_release_does(discrete_agent):
    agent, data = discrete_agent
    obs = {k: np.repeat(v, 20, 0) for k, v in first_step(data, 0).items()}
    _, state = agent.policy(obs, None, "eval")
    (_, first), (_, second) = agent.policy(obs, state, "eval"), agent.policy(obs, with_key(state, 1), "eval")
    np.testing.assert_allclose(latent_of(first)["logit"], latent_of(second)["logit"], rtol=1e-6)
    # 20 x 4 categorical draws from near-uniform posteriors: some differ between the two keys.
    assert not np.array_equal(latent_of(first)["stoch"], latent_of(second)["stoch"])
    # The draws are a function of the key: the same state gives the same sample.
    np.testing.assert_array_equal(latent_of(first)["stoch"], latent_of(agent.policy(obs, state, "eval")[1])["stoch"])


def test_eval_policy_with_eval_state_mean_is_deterministic_and_train_policy_samples(discrete_agent):
    _, data = discrete_agent
    agent = make_agent(obs_space(IMAGE), discrete_actions(3), {**SMALL, "eval_state_mean": True})
    obs = {k: np.repeat(v, 20, 0) for k, v in first_step(data, 0).items()}
    _, state = agent.policy(obs, None, "eval")
    first, state1 = agent.policy(obs, state, "eval")
    second, state2 = agent.policy(obs, state, "eval")
    np.testing.assert_array_equal(first["action"], second["action"])
    for key in latent_of(state1):
        np.testing.assert_array_equal(latent_of(state1)[key], latent_of(state2)[key])
    samples = [agent.policy(obs, with_key(state, seed), "train")[0]["action"] for seed in range(2)]
    assert not np.array_equal(samples[0], samples[1])  # 60 draws from a near-uniform initial policy


@pytest.mark.parametrize("mode", POLICY_MODES)
def test_discrete_policy_modes_return_one_hot_actions(discrete_agent, mode):
    agent, data = discrete_agent
    action, state = agent.policy(first_step(data, 0), None, mode)
    action = action["action"]
    assert action.shape == (3, 3) and action.dtype == np.float32
    assert set(np.unique(action)) <= {0.0, 1.0}
    np.testing.assert_array_equal(action.sum(-1), 1.0)


def test_continuous_policy_modes_stay_within_bounds():
    obs, act = obs_space(IMAGE), continuous_actions(2)
    # Large noise would leave [-1, 1] without clipping.
    agent = make_agent(obs, act, {**SMALL, "expl_noise": 2.0, "eval_noise": 2.0})
    data = random_batch(obs, act, batch=16, length=2)
    for mode in POLICY_MODES:
        action = agent.policy(first_step(data, 0), None, mode)[0]["action"]
        assert action.shape == (16, 2) and action.dtype == np.float32, mode
        assert action.min() >= -1.0 and action.max() <= 1.0, mode
        assert action.std() > 0.01, mode


def test_invalid_policy_mode_and_precision_raise(discrete_agent):
    agent, data = discrete_agent
    with pytest.raises(ValueError, match="policy mode must be one of train, eval, explore, random"):
        agent.policy(first_step(data, 0), None, "greedy")
    with pytest.raises(ValueError, match="precision must be one of auto, 32, 16, bf16"):
        resolve_precision("64")


def test_compiled_policy_acts_like_the_eager_one():
    # Eval mode with the posterior mode and the actor's mode draws nothing at random, so the policy graph
    # (with its pruned prior) and eager execution of the same step must give the same actions.
    obs, act = obs_space(IMAGE), discrete_actions(3)
    agent = make_agent(obs, act, {**SMALL, "eval_state_mean": True}, seed=7)
    data = random_batch(obs, act, batch=3, length=4, seed=8)
    steps = [{"image": data["image"][:, t], "is_first": np.full(3, t == 0)} for t in range(4)]

    def run(policy):
        state, actions = agent.initial_state(3), []
        for step in steps:
            action, state = policy({key: tf.convert_to_tensor(value) for key, value in step.items()}, state)
            actions.append(np.asarray(action["action"] if isinstance(action, dict) else action))
        return np.stack(actions), state

    compiled, compiled_state = run(lambda obs, state: agent.policy(obs, state, "eval"))
    eager, eager_state = run(lambda obs, state: agent._policy_step(obs, state, "eval"))
    np.testing.assert_array_equal(compiled, eager)
    np.testing.assert_allclose(compiled_state[0]["logit"].numpy(), eager_state[0]["logit"].numpy(), rtol=1e-5,
                               atol=1e-6)
    assert len({tuple(row) for row in compiled.reshape(-1, 3)}) > 1  # the actions depend on the input


def test_one_policy_graph_serves_any_batch_size_and_a_new_dtype_gets_its_own():
    obs, act = obs_space(IMAGE, vector=2), discrete_actions(3)
    agent = make_agent(obs, act, {**SMALL, "eval_state_mean": True}, seed=7)
    data = random_batch(obs, act, batch=3, length=1, seed=8)
    step = {"image": data["image"][:, 0], "vector": data["vector"][:, 0].astype(np.float32),
            "is_first": np.ones(3, bool)}
    batch3 = agent.policy(step, None, "eval")[0]["action"]
    batch1 = agent.policy({key: value[1:2] for key, value in step.items()}, None, "eval")[0]["action"]
    np.testing.assert_array_equal(batch1, batch3[1:2])
    assert len(agent._policies.graphs) == 1
    wide = agent.policy({**step, "vector": step["vector"].astype(np.float64)}, None, "eval")[0]["action"]
    np.testing.assert_array_equal(wide, batch3)
    assert len(agent._policies.graphs) == 2


@pytest.mark.parametrize("devices, auto", [([], False), (["/device:GPU:0"], True)])
def test_jit_auto_is_xla_on_a_gpu_and_off_on_cpus(monkeypatch, devices, auto):
    asked = []

    def logical_devices(kind=None):
        asked.append(kind)
        return list(devices) if kind == "GPU" else ["/device:CPU:0"]

    monkeypatch.setattr(tf.config, "list_logical_devices", logical_devices)
    assert resolve_jit("auto") is auto and asked == ["GPU"]
    assert resolve_jit("true") is True and resolve_jit("false") is False  # an explicit choice wins
    with pytest.raises(ValueError, match="jit must be auto, true or false"):
        resolve_jit("maybe")


def test_report_returns_open_loop_video(discrete_agent):
    agent, data = discrete_agent
    video = agent.report(data)["openl_image"].numpy()
    # Truth, model and error stacked along the height axis.
    assert video.shape == (3, 8, 3 * IMAGE[0], IMAGE[1], IMAGE[2])
    assert video.min() >= 0.0 and video.max() <= 1.0
    np.testing.assert_allclose(video[:, :, : IMAGE[0]], data["image"] / 255.0, atol=1e-6)


# XLA against plain graphs. Sampled latents (and actions) make two runs differ: XLA draws other
# random numbers than the CPU kernels. Scaling the logit layers by 1e4 makes every categorical
# distribution so peaked that a sample is its mode (Gumbel noise in float32 is bounded by ~20),
# so the computation becomes deterministic and both compilations must agree up to rounding.


def sharpen(layers) -> None:
    for layer in layers:
        for var in layer.variables:
            var.assign(var * 1e4)


def test_world_model_loss_agrees_with_and_without_xla():
    keras.utils.set_random_seed(0)
    wm = WorldModel({"image": IMAGE}, 3, tiny_config(SMALL))
    wm.build()
    sharpen([wm.rssm._obs_stats, wm.rssm._img_stats])
    data = random_batch(obs_space(IMAGE), discrete_actions(3), batch=2, length=5, seed=3)
    data["is_first"][1, 2] = True

    def loss(data):
        return wm.loss(data)[3]

    plain, xla = tf.function(loss), tf.function(loss, jit_compile=True)
    first, again, compiled = plain(data), plain(data), xla(data)
    for key in ("model_kl", "image_loss", "reward_loss", "discount_loss"):
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())  # deterministic indeed
        np.testing.assert_allclose(compiled[key].numpy(), first[key].numpy(), rtol=1e-4, err_msg=key)


@pytest.mark.slow
def test_agent_train_step_agrees_with_and_without_xla():
    obs, act = obs_space(IMAGE), discrete_actions(3)
    data = random_batch(obs, act, batch=2, length=5, seed=4)
    agents = [make_agent(obs, act, {**SMALL, "jit": jit}, seed=5) for jit in (False, True)]
    for agent in agents:
        sharpen([agent.wm.rssm._obs_stats, agent.wm.rssm._img_stats, agent.ac.actor._head._out])
    for a, b in zip(agents[0].variables, agents[1].variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same seed, same initial weights
    plain, xla = (agent.train(data)[0] for agent in agents)
    # Compare losses and gradient norms, not updated weights: Adam's first step is about lr * sign(grad)
    # and flips for gradients near zero, so weights after one update are no finer test than these.
    keys = ("model_loss", "image_loss", "reward_loss", "kl_loss", "actor_loss", "critic_loss", "critic_target",
            "model_grad_norm", "actor_grad_norm", "critic_grad_norm")
    for key in keys:
        np.testing.assert_allclose(xla[key].numpy(), plain[key].numpy(), rtol=1e-3, atol=1e-5, err_msg=key)


def test_checkpoint_holds_every_variable_of_the_agent(tmp_path):
    """Each variable, including those of layers held in sequences and the slow critic, round-trips."""
    from dreamerv2_tf.loop.checkpoint import Checkpointer

    def variables(agent):
        layers = [*agent.wm.modules, agent.ac.actor, agent.ac.critic, agent.ac.slow_critic]
        optimizers = [agent.wm.opt.opt, agent.ac.actor_opt.opt, agent.ac.critic_opt.opt]
        return [v for layer in layers for v in layer.variables] + [v for o in optimizers for v in o.variables]

    obs, act = obs_space(IMAGE, vector=3), continuous_actions(2)
    # Layer norm and the vector keys add the norm layers and the decoder's per-key MLP heads.
    overrides = {**SMALL, r".*\.norm": "layer", "encoder.mlp_keys": "vector", "decoder.mlp_keys": "vector"}
    source, target = make_agent(obs, act, overrides, seed=1), make_agent(obs, act, overrides, seed=2)
    rng = np.random.default_rng(0)
    for variable in variables(source):
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype))
    Checkpointer(tmp_path / "ckpt", 1, agent=source).save(7)
    assert Checkpointer(tmp_path / "ckpt", 1, agent=target).restore().endswith("ckpt-7")
    pairs = list(zip(variables(source), variables(target), strict=True))
    assert len(pairs) > 100 and len(target.ac.slow_critic.variables) == len(target.ac.critic.variables) > 4
    for before, after in pairs:
        np.testing.assert_array_equal(before.numpy(), after.numpy(), err_msg=after.path)


def test_train_behavior_off_updates_the_world_model_only():
    obs, act = obs_space(IMAGE), discrete_actions(3)
    data = random_batch(obs, act, batch=2, length=5, seed=6)
    agent = make_agent(obs, act, {**SMALL, "train_behavior": False}, seed=7)
    values = lambda variables: [v.numpy().copy() for v in variables]  # noqa: E731
    model, behavior = values(agent.wm.variables_to_train), values(agent.ac.variables)
    metrics, _ = agent.train(data)
    assert "model_loss" in metrics and "actor_loss" not in metrics and "critic_loss" not in metrics
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(model, agent.wm.variables_to_train, strict=True))
    for before, after in zip(behavior, agent.ac.variables, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.name)


@pytest.mark.parametrize("act", [discrete_actions(3), continuous_actions(2)], ids=["discrete", "continuous"])
def test_policy_draws_only_from_the_key_it_carries(act):
    # An ensemble prior and action noise, so that every random draw of the step is in the graph.
    agent = make_agent(obs_space(IMAGE), act, {**SMALL, "rssm.ensemble": 2, "expl_noise": 0.3, "eval_noise": 0.3})
    data = random_batch(obs_space(IMAGE), act, batch=4, length=1)
    for mode in POLICY_MODES:
        state = agent.initial_state(4, seed=3)
        first, second = agent.policy(first_step(data, 0), state, mode), agent.policy(first_step(data, 0), state, mode)
        np.testing.assert_array_equal(first[0]["action"], second[0]["action"], err_msg=mode)
        np.testing.assert_array_equal(first[1][2].numpy(), second[1][2].numpy())  # the next key too
        assert not np.array_equal(first[1][2].numpy(), state[2].numpy())
    # No stateful random op anywhere in the policy graphs (they would draw from TensorFlow's global seed).
    ops = set()
    for graph in agent._policies.graphs.values():
        definition = graph.graph.as_graph_def()
        ops |= {node.op for node in definition.node}
        ops |= {node.op for function in definition.library.function for node in function.node_def}
    random_ops = {op for op in ops if "Random" in op or op in ("Multinomial", "TruncatedNormal")}
    assert random_ops and all(op.startswith("Stateless") for op in random_ops), sorted(random_ops)
