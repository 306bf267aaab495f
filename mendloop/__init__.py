"""mendloop: closes the loop between failures in a running system and the code behind them."""

__version__ = "0.1.0"
