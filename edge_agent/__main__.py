from edge_agent.cli import app

app(prog_name="edge-agent")
