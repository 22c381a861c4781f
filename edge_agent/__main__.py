from edge_agent.device.cli import app

app(prog_name="edge-agent")
