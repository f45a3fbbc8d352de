"""Atari through gymnasium's AtariPreprocessing on ALE v5, with the paper's protocol (section 3).

A thin layer: ALE runs one emulator frame per call (frameskip=1) and applies its own
sticky actions; gymnasium's AtariPreprocessing does the action repeat, the max over
the last two frames, grayscale, the area resize and the random no-ops at reset. What
is added here is the episode rule and the env protocol of `envs.base`: every reset
starts a new game, except that with `lives` an episode ended by a lost life (game
not over) continues the same game. Time limits are applied outside
(wrappers.TimeLimit, in agent steps), so a game over is always a real termination.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from gymnasium import spaces

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

RAM_BYTES = 128  # the Atari 2600's RAM
STICKY_PROB = 0.25  # Machado et al. (2018): ALE repeats the previous frame's action with this probability.


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
    """One Atari game; obs 'image' uint8 (H, W, 1) grayscale or (H, W, 3), one-hot discrete actions.

    `action_repeat` emulator frames per step (max over the last two), `sticky` turns on ALE's
    sticky actions, `all_actions` selects the 18 legal actions instead of the game's minimal
    set, `noops` is the most random no-op frames at the start of each game, `lives` ends
    an episode (as terminal) at every lost life, and `ram` adds the console's 128 bytes of RAM
    after each step as the uint8 vector 'ram'.
    """

    def __init__(self, game: str, *, seed: int = 0, action_repeat: int = 4,
                 size: tuple[int, int] = (64, 64), sticky: bool = True, all_actions: bool = True,
                 noops: int = 0, grayscale: bool = True, lives: bool = False, ram: bool = False) -> None:
        import gymnasium
        from gymnasium.wrappers import AtariPreprocessing

        if action_repeat < 1:
            raise ValueError(f"action_repeat must be at least 1, got {action_repeat}")
        if noops < 0:
            raise ValueError(f"atari.noops must be zero or positive, got {noops}")
        name = ale_name(game)
        _register()
        height, width = int(size[0]), int(size[1])
        # max_num_frames_per_episode=0 removes the registered 108k-frame cutoff, so a game over
        # is never a truncation; the agent-step time limit is a separate wrapper. The inner
        # observation type only saves a copy per frame: the wrapper reads the ALE screen itself.
        inner = gymnasium.make(
            f"ALE/{name}-v5", obs_type="grayscale" if grayscale else "rgb", frameskip=1,
            repeat_action_probability=STICKY_PROB if sticky else 0.0,
            full_action_space=bool(all_actions), max_num_frames_per_episode=0,
            disable_env_checker=True)
        self._env = AtariPreprocessing(
            inner, noop_max=int(noops), frame_skip=int(action_repeat), screen_size=(width, height),
            terminal_on_life_loss=bool(lives), grayscale_obs=bool(grayscale), grayscale_newaxis=True)
        self._grayscale = bool(grayscale)
        self._lives = bool(lives)
        self._seed: int | None = int(seed)  # used by the first reset only; later ones continue its RNG
        self._continue_game = False  # the last episode ended by a lost life, the game is not over
        self._ram = bool(ram)
        self.obs_space = {"image": base.image_space((height, width), 1 if grayscale else 3),
                          **base.flag_spaces()}
        if self._ram:
            self.obs_space["ram"] = spaces.Box(0, 255, (RAM_BYTES,), np.uint8)
        self.act_space = base.discrete_act_space(self._env.action_space.n)

    @property
    def action_meanings(self) -> list[str]:
        return list(self._env.unwrapped.get_action_meanings())

    @property
    def ale(self) -> Any:
        """The emulator (lives, frame numbers, screens), for inspection."""
        return self._env.unwrapped.ale

    def reset(self) -> dict[str, np.ndarray]:
        if self._continue_game:
            self._continue_game = False
            image = self._current_frame()
        else:
            # A new game with its no-ops, whatever ended the last episode (game over, time
            # limit, or a driver reset in the middle of an episode).
            seed, self._seed = self._seed, None
            image, _ = self._env.reset(seed=seed)
        return self._obs(image, base.flags(first=True))

    def step(self, action: Mapping[str, Any]) -> dict[str, np.ndarray]:
        index = base.discrete_index(action, int(self.act_space["action"].n))
        image, reward, terminated, truncated, _ = self._env.step(index)
        # With `lives`, `terminated` also marks a lost life; the game then goes on at reset.
        self._continue_game = bool(self._lives and terminated
                                   and not self.ale.game_over(with_truncation=False))
        last = bool(terminated or truncated)  # ALE never truncates here: its frame cap is off
        return self._obs(image, base.flags(float(reward), last=last, terminal=bool(terminated)))

    def close(self) -> None:
        self._env.close()

    def _obs(self, image: np.ndarray, flags: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {"image": image, **flags}
        if self._ram:
            obs["ram"] = np.array(self.ale.getRAM(), np.uint8)  # a copy: ALE reuses its buffer
        return obs

    def _current_frame(self) -> np.ndarray:
        """The current screen as the wrapper's reset presents it, without starting a new game."""
        wrapper = self._env
        if self._grayscale:
            self.ale.getScreenGrayscale(wrapper.obs_buffer[0])
        else:
            self.ale.getScreenRGB(wrapper.obs_buffer[0])
        wrapper.obs_buffer[1].fill(0)  # nothing to pool with: a single frame, as after reset
        return wrapper._get_obs()
