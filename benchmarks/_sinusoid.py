"""The sinusoid meta-learning game shared by the memory and scaling benchmarks.

Each of ``B`` players (tasks) owns the parameters of a 1-40-40-1 MLP (1,761 numbers, the
sinusoid regression network of MAML and of the paper), stored as one row of a ``(B, 1761)`` tensor.
The meta-parameter ``theta`` has shape ``(1761,)``.  Player ``i`` minimises

.. math:: f_i(\\phi) = \\mathrm{MSE}_i(\\phi_i) + \\tfrac{\\lambda}{2}\\|\\phi_i - \\theta\\|^2
          + w\\,\\|\\theta - \\tfrac1B\\textstyle\\sum_k \\phi_k\\|^2,

the training loss on its own K-shot data :math:`y = a\\sin(x + b)`, a proximal term towards
``theta``, and a coupling through the centroid of all players.  The coupling depends on the other
players only through the aggregate :math:`s = \\sum_k \\phi_k / B`, so the game is an
:class:`implicit_nash.AggregativeGame`; :func:`cost_game` builds the same costs as a generic
:class:`implicit_nash.CostGame` for comparison.

The network's activation is ReLU by default (as in MAML); ``activation="tanh"`` gives a smooth
variant.  With ReLU the pseudo-gradient is only piecewise smooth: the gradient of the MSE jumps
where a hidden pre-activation at a training input crosses zero, so no proximal weight makes it
Lipschitz, and fixed-step iterations can chatter across such a kink instead of converging.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

#: Shapes of the MLP's parameters in the order they are stored in the flat vector
#: (weight, bias of layer 1; weight, bias of layer 2; weight, bias of the output layer).
LAYER_SHAPES: List[Tuple[int, ...]] = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
#: Number of parameters of one player: 40 + 40 + 1600 + 40 + 40 + 1 = 1761.
NUM_PARAMS = sum(math.prod(s) for s in LAYER_SHAPES)
#: Support (training) points per task, the K of K-shot regression.
SHOTS = 5
#: Query points per task, used by the meta-loss.
QUERIES = 10
#: The hidden layers' activation functions, by name.
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}


def mlp(flat: torch.Tensor, x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Evaluate the 1-40-40-1 MLP whose parameters are the flat vector ``flat``.

    Args:
        flat: the ``(1761,)`` parameter vector (no batch dimension; vmap over players).
        x: inputs of shape ``(K,)``.
        activation: the hidden layers' activation, a key of :data:`ACTIVATIONS`.

    Returns:
        Predictions of shape ``(K,)``.
    """
    params = []
    offset = 0
    for shape in LAYER_SHAPES:
        size = math.prod(shape)
        params.append(flat[offset:offset + size].reshape(shape))
        offset += size
    w1, b1, w2, b2, w3, b3 = params
    act = ACTIVATIONS[activation]
    h = act(x.unsqueeze(-1) @ w1.T + b1)
    h = act(h @ w2.T + b2)
    return (h @ w3.T + b3).squeeze(-1)


def preactivations(flat: torch.Tensor, x: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """The hidden units' pre-activations of the MLP ``flat`` at the inputs ``x``, shape ``(K, 80)``.

    With ReLU the MLP's gradient is discontinuous where one of these crosses zero (a kink).
    """
    sizes = [math.prod(shape) for shape in LAYER_SHAPES]
    w1, b1, w2, b2, _, _ = [p.reshape(shape) for p, shape in zip(flat.split(sizes), LAYER_SHAPES)]
    a1 = x.unsqueeze(-1) @ w1.T + b1
    a2 = ACTIVATIONS[activation](a1) @ w2.T + b2
    return torch.cat([a1, a2], dim=-1)


def mse(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, activation: str = "relu") -> torch.Tensor:
    """Mean squared error of the MLP ``flat`` on the points ``(x, y)``."""
    return ((mlp(flat, x, activation) - y) ** 2).mean()


def init_theta(generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A meta-parameter drawn like PyTorch's default ``nn.Linear`` initialisation.

    Every weight and bias of a layer with ``fan_in`` inputs is uniform in
    :math:`[-1/\\sqrt{\\text{fan\\_in}}, 1/\\sqrt{\\text{fan\\_in}}]`.
    """
    fan_ins = [1, 1, 40, 40, 40, 40]
    parts = []
    for shape, fan_in in zip(LAYER_SHAPES, fan_ins):
        bound = 1.0 / math.sqrt(fan_in)
        parts.append((torch.rand(math.prod(shape), generator=generator, dtype=dtype) * 2 - 1) * bound)
    return torch.cat(parts)


@dataclass
class Tasks:
    """Sinusoid regression tasks :math:`y = a\\sin(x + b)`: support (training) and query sets.

    Attributes:
        x, y: support points, shape ``(B, K)``.
        xq, yq: query points used by the meta-loss, shape ``(B, Q)``.
        amplitude, phase: the task parameters ``a`` in [0.1, 5] and ``b`` in [0, pi], shape ``(B,)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    amplitude: torch.Tensor
    phase: torch.Tensor


def sample_tasks(num_tasks: int, shots: int, queries: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float64) -> Tasks:
    """Draw ``num_tasks`` sinusoid tasks with ``shots`` support and ``queries`` query points each.

    Inputs are uniform in [-5, 5], amplitudes in [0.1, 5.0] and phases in [0, pi] (the MAML setup).
    """
    def uniform(shape, low, high):
        return torch.rand(shape, generator=generator, dtype=dtype) * (high - low) + low

    amplitude = uniform((num_tasks,), 0.1, 5.0)
    phase = uniform((num_tasks,), 0.0, math.pi)
    x = uniform((num_tasks, shots), -5.0, 5.0)
    xq = uniform((num_tasks, queries), -5.0, 5.0)
    y = amplitude[:, None] * torch.sin(x + phase[:, None])
    yq = amplitude[:, None] * torch.sin(xq + phase[:, None])
    return Tasks(x, y, xq, yq, amplitude, phase)


def aggregative_game(tasks: Tasks, lam: float = 1.0, w: float = 0.1, activation: str = "relu"):
    """The sinusoid game as an :class:`implicit_nash.AggregativeGame` (O(B) pseudo-gradient).

    Args:
        tasks: the players' data (``tasks.x``, ``tasks.y`` of shape ``(B, K)``).
        lam: weight of the proximal term :math:`\\tfrac{\\lambda}{2}\\|\\phi_i - \\theta\\|^2`.
        w: weight of the centroid coupling :math:`w\\|\\theta - \\bar\\phi\\|^2`.
        activation: the MLP's hidden activation (see :data:`ACTIVATIONS`).
    """
    import implicit_nash

    num_players = tasks.x.shape[0]

    def local(phi_i, theta, x_i, y_i):
        # Player i's own training loss plus the proximal pull towards the meta-parameter.
        return mse(phi_i, x_i, y_i, activation) + 0.5 * lam * ((phi_i - theta) ** 2).sum()

    def contribution(phi_i, theta):
        # Player i's share of the aggregate s = mean_k phi_k.
        return phi_i / num_players

    def coupling(phi_i, theta, s, *data_i):
        # Centroid coupling; depends on phi_i only through s (which contains phi_i / B).  The task
        # data is not used; ``*data_i`` accepts it when the library passes it to the coupling too.
        return w * ((theta - s) ** 2).sum()

    return implicit_nash.AggregativeGame(local=local, contribution=contribution, coupling=coupling,
                                         data=(tasks.x, tasks.y))


def cost_function(tasks: Tasks, lam: float = 1.0, w: float = 0.1, activation: str = "relu") -> Callable:
    """The same costs as :func:`aggregative_game`, as one function ``costs(phi, theta) -> (B,)``."""
    def costs(phi, theta):
        train = torch.vmap(functools.partial(mse, activation=activation))(phi, tasks.x, tasks.y)
        prox = 0.5 * lam * ((phi - theta) ** 2).sum(1)
        centroid = w * ((theta - phi.mean(0)) ** 2).sum()
        return train + prox + centroid

    return costs


def cost_game(tasks: Tasks, lam: float = 1.0, w: float = 0.1, activation: str = "relu"):
    """The sinusoid game as a generic :class:`implicit_nash.CostGame` (O(B^2) jacrev fallback)."""
    import implicit_nash

    return implicit_nash.CostGame(cost_function(tasks, lam, w, activation))


def meta_loss(phi: torch.Tensor, tasks: Tasks, activation: str = "relu") -> torch.Tensor:
    """Scalar meta-loss of an equilibrium: the players' query MSE averaged over players."""
    return torch.vmap(functools.partial(mse, activation=activation))(phi, tasks.xq, tasks.yq).mean()
