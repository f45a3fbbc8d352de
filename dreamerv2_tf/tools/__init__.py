"""Tools around runs: score tables, FLOP counts, open-loop predictions and the Pong ball tracker."""
