"""The terminal UI of anima-train: edit profiles, launch detached runs, watch them. Reads run directories only."""
