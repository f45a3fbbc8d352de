"""Atari through ale-py with the evaluation protocol of the paper (section 3, Machado et al. 2018).

ALE itself runs one emulator frame per call with its own sticky actions off; the
protocol is implemented here so that every random choice comes from one seeded
generator: sticky actions per emulator frame, action repeat with a max over the
last two frames, grayscale, area resize, optional no-ops at reset. Time limits
are applied outside (wrappers.TimeLimit), so a game over is always a real
termination.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dreamerv2_tf.envs import base

# The 55 games of the paper's Table K1: task suffix -> ALE environment name.
GAMES = {
    "alien": "Alien", "amidar": "Amidar", "assault": "Assault", "asterix": "Asterix",
    "asteroids": "Asteroids", "atlantis": "Atlantis", "bank_heist": "BankHeist",
    "battle_zone": "BattleZone", "beam_rider": "BeamRider", "berzerk": "Berzerk",
    "bowling": "Bowling", "boxing": "Boxing", "breakout": "Breakout", "centipede": "Centipede",
    "chopper_command": "ChopperCommand", "crazy_climber": "CrazyClimber",
    "demon_attack": "DemonAttack", "double_dunk": "DoubleDunk", "enduro": "Enduro",
    "fishing_derby": "FishingDerby", "freeway": "Freeway", "frostbite": "Frostbite",
    "gopher": "Gopher", "gravitar": "Gravitar", "hero": "Hero", "ice_hockey": "IceHockey",
    "james_bond": "Jamesbond", "kangaroo": "Kangaroo", "krull": "Krull",
    "kung_fu_master": "KungFuMaster", "montezuma_revenge": "MontezumaRevenge",
    "ms_pacman": "MsPacman", "name_this_game": "NameThisGame", "phoenix": "Phoenix",
    "pitfall": "Pitfall", "pong": "Pong", "private_eye": "PrivateEye", "qbert": "Qbert",
    "riverraid": "Riverraid", "road_runner": "RoadRunner", "robotank": "Robotank",
    "seaquest": "Seaquest", "skiing": "Skiing", "solaris": "Solaris",
    "space_invaders": "SpaceInvaders", "star_gunner": "StarGunner", "tennis": "Tennis",
    "time_pilot": "TimePilot", "tutankham": "Tutankham", "up_n_down": "UpNDown",
    "venture": "Venture", "video_pinball": "VideoPinball", "wizard_of_wor": "WizardOfWor",
    "yars_revenge": "YarsRevenge", "zaxxon": "Zaxxon",
}

STICKY_PROB = 0.25  # Machado et al. (2018): repeat the previous emulator action with this probability.
NOOP = 0  # Index of NOOP in both the full and the minimal ALE action sets.


def _register() -> None:
    import ale_py
    import gymnasium

    gymnasium.register_envs(ale_py)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def all_games() -> dict[str, str]:
    """Paper games plus any other game ale-py ships (e.g. air_raid), by snake_case name."""
    import gymnasium

    _register()
    games = {}
    known = set(GAMES.values())
    for env_id in gymnasium.registry:
        match = re.fullmatch(r"ALE/(\w+)-v5", env_id)
        if match and match.group(1) not in known:
            games[_snake(match.group(1))] = match.group(1)
    games.update(GAMES)
    return games


def ale_name(game: str) -> str:
    """ALE environment name for a task suffix; ValueError with close names when unknown."""
    if game in GAMES:
        return GAMES[game]
    games = all_games()
    if game in games:
        return games[game]
    close = difflib.get_close_matches(game, list(games), n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join('atari_' + name for name in close)}" if close else ""
    raise ValueError(f"unknown Atari game '{game}'{hint} (the paper's 55 games are listed in "
                     "dreamerv2_tf.envs.atari.GAMES)")


class Atari:
    """One Atari game; obs 'image' uint8 (H, W, 1) grayscale or (H, W, 3), one-hot discrete actions."""

    def __init__(self, game: str, *, seed: int = 0, action_repeat: int = 4,
                 size: tuple[int, int] = (64, 64), sticky: bool = True, all_actions: bool = True,
                 noops: int = 0, grayscale: bool = True, lives: bool = False):
        import gymnasium

        if action_repeat < 1:
            raise ValueError(f"action_repeat must be at least 1, got {action_repeat}")
        if noops < 0:
            raise ValueError(f"atari.noops must be zero or positive, got {noops}")
        name = ale_name(game)
        _register()
        # frameskip=1 and no ALE stickiness: both are done below, per emulator frame.
        # max_num_frames_per_episode=0 removes the registered 108k-frame cutoff so that a game
        # over is never a truncation; the agent-step time limit is a separate wrapper.
        env = gymnasium.make(f"ALE/{name}-v5", frameskip=1, repeat_action_probability=0.0,
                             full_action_space=all_actions, max_num_frames_per_episode=0)
        self._gym_env = env
        self._ale_env = env.unwrapped
        self._ale_env.reset(seed=int(seed))  # seeds the emulator's own randomness and loads the ROM
        self._ale = self._ale_env.ale
        self._actions = (self._ale.getLegalActionSet() if all_actions
                         else self._ale.getMinimalActionSet())
        self._rng = np.random.default_rng(seed)
        self._repeat = int(action_repeat)
        self._size = (int(size[0]), int(size[1]))
        self._sticky = bool(sticky)
        self._noops = int(noops)
        self._grayscale = bool(grayscale)
        self._lives_signal = bool(lives)
        height, width = self._ale.getScreenDims()
        shape = (height, width) if grayscale else (height, width, 3)
        self._buffers = [np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)]
        self._last_action = NOOP  # the emulator action executed on the previous frame
        self._lives = 0
        self._needs_game_reset = True
        self.obs_space = {"image": base.image_space(self._size, 1 if grayscale else 3), **base.flag_spaces()}
        self.act_space = base.discrete_act_space(len(self._actions))
        self.frame_log: list[int] | None = None  # when a list, executed emulator actions are appended

    @property
    def action_meanings(self) -> list[str]:
        return [str(action).split(".")[-1] for action in self._actions]

    def reset(self) -> dict[str, np.ndarray]:
        # With the life-loss signal on, an episode ends at each lost life but the game continues.
        if self._needs_game_reset or self._ale.game_over(with_truncation=False):
            self._ale.reset_game()
            self._last_action = NOOP
            for _ in range(int(self._rng.integers(1, self._noops + 1)) if self._noops else 0):
                self._frame(NOOP)
                if self._ale.game_over(with_truncation=False):
                    self._ale.reset_game()
            self._needs_game_reset = False
        self._lives = self._ale.lives()
        self._screen(self._buffers[0])
        return {"image": self._image([self._buffers[0]]), **base.flags(first=True)}

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        index = base.discrete_index(action, len(self._actions))
        reward = 0.0
        captured = []
        over = False
        for frame in range(self._repeat):
            reward += self._frame(index)
            over = self._ale.game_over(with_truncation=False)
            # Keep the last two frames of the repeat for the max-pool (Atari sprites flicker).
            if frame >= self._repeat - 2 or over:
                buffer = self._buffers[len(captured) % 2]
                self._screen(buffer)
                captured.append(buffer)
            if over:
                break
        lives = self._ale.lives()
        life_lost = self._lives_signal and lives < self._lives
        self._lives = lives
        if over:
            self._needs_game_reset = True
        terminal = over or life_lost
        image = self._image(captured[-2:])
        return {"image": image, **base.flags(reward, last=terminal, terminal=terminal)}

    def close(self) -> None:
        self._gym_env.close()

    def _frame(self, index: int) -> float:
        """Advance one emulator frame, repeating the previous action with the sticky probability."""
        if self._sticky and self._rng.random() < STICKY_PROB:
            index = self._last_action
        self._last_action = index
        if self.frame_log is not None:
            self.frame_log.append(index)
        return float(self._ale.act(self._actions[index]))

    def _screen(self, buffer: np.ndarray) -> None:
        if self._grayscale:
            self._ale.getScreenGrayscale(buffer)
        else:
            self._ale.getScreenRGB(buffer)

    def _image(self, frames: list[np.ndarray]) -> np.ndarray:
        image = frames[0] if len(frames) == 1 else np.maximum(frames[0], frames[1])
        return base.resize_image(image, self._size)
