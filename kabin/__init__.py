"""kabin: Kadeploy rebuilt as a toolkit of composable Unix commands.

The library never prints and never exits: commands are thin click layers in
``kabin.cli`` over the functions of the modules below.
"""

__version__ = "0.1.0"
