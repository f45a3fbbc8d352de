"""The algorithm: networks, distributions, the world model, actor and critic, and the agent that trains them."""
