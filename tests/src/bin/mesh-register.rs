//! A workload's side of the registration API, for the end-to-end tests and the demo: registers
//! over the node agent's unix socket and prints every event of the session as one JSON line
//! (until the stream ends or the process is killed), or asks `Discover`, or `Deregister`.
//! Exit codes: 0 done, 1 the agent refused (the gRPC code and message on stderr), 2 usage.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_proto::registry::v1::{
    DeregisterRequest, DiscoverRequest, Protocol, RegisterRequest, discover_request::Selector,
    registration_event::Event, registry_client::RegistryClient,
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-register",
    about = "Register with the node agent, discover instances"
)]
struct Cli {
    /// The agent's registration socket.
    #[arg(long, default_value = "/run/mesh/agent.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register and keep the session open (one JSON line per event).
    Register {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: Option<u32>,
        #[arg(long)]
        address: Option<String>,
        /// http, mcp, a2a or grpc.
        #[arg(long, default_value = "http")]
        protocol: String,
        #[arg(long = "tool")]
        tools: Vec<String>,
        #[arg(long = "skill")]
        skills: Vec<String>,
        #[arg(long)]
        health_path: Option<String>,
    },
    /// Healthy instances offering a tool, a skill, or of an agent (a JSON array).
    Discover {
        #[arg(long, group = "selector")]
        tool: Option<String>,
        #[arg(long, group = "selector")]
        skill: Option<String>,
        #[arg(long, group = "selector")]
        agent: Option<String>,
    },
    /// End a registration early.
    Deregister {
        #[arg(long)]
        id: String,
    },
}

async fn connect(socket: PathBuf) -> Result<RegistryClient<Channel>, tonic::transport::Error> {
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::from_static("http://mesh-agent.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(RegistryClient::new(channel))
}

fn refused(status: &tonic::Status) -> ExitCode {
    eprintln!("refused: {:?}: {}", status.code(), status.message());
    ExitCode::from(1)
}

fn protocol(text: &str) -> Option<Protocol> {
    match text.to_ascii_lowercase().as_str() {
        "http" => Some(Protocol::Http),
        "mcp" => Some(Protocol::Mcp),
        "a2a" => Some(Protocol::A2a),
        "grpc" => Some(Protocol::Grpc),
        _ => None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut client = match connect(cli.socket.clone()).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("cannot connect to {}: {error}", cli.socket.display());
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Register {
            name,
            port,
            address,
            protocol: protocol_name,
            tools,
            skills,
            health_path,
        } => {
            let Some(protocol) = protocol(&protocol_name) else {
                eprintln!("unknown protocol {protocol_name}");
                return ExitCode::from(2);
            };
            let request = RegisterRequest {
                name,
                namespace: String::new(),
                protocol: protocol as i32,
                port: port.unwrap_or(0),
                address: address.unwrap_or_default(),
                mcp_tools: tools,
                a2a_skills: skills,
                health_check_path: health_path.unwrap_or_default(),
            };
            let started = std::time::Instant::now();
            let mut stream = match client.register(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => return refused(&status),
            };
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let line = match event.event {
                            Some(Event::Registered(registered)) => json!({
                                "event": "registered",
                                "instanceId": registered.instance_id,
                                "identity": registered.identity,
                                "node": registered.node,
                                "address": registered.address,
                                "record": registered.record,
                                "health": registered.health,
                                // From the call to this event (attestation, enrolment, the
                                // first probe, publication).
                                "elapsedMs": started.elapsed().as_secs_f64() * 1000.0,
                            }),
                            Some(Event::Health(health)) => json!({
                                "event": "health", "health": health.health, "reason": health.reason,
                            }),
                            Some(Event::Heartbeat(beat)) => {
                                json!({"event": "heartbeat", "sequence": beat.sequence})
                            }
                            None => json!({"event": "unknown"}),
                        };
                        println!("{line}");
                    }
                    Ok(None) => {
                        println!("{}", json!({"event": "ended"}));
                        return ExitCode::SUCCESS;
                    }
                    Err(status) => return refused(&status),
                }
            }
        }
        Command::Discover { tool, skill, agent } => {
            let selector = match (tool, skill, agent) {
                (Some(tool), _, _) => Selector::McpTool(tool),
                (_, Some(skill), _) => Selector::A2aSkill(skill),
                (_, _, Some(agent)) => Selector::Agent(agent),
                _ => {
                    eprintln!("give --tool, --skill or --agent");
                    return ExitCode::from(2);
                }
            };
            match client
                .discover(DiscoverRequest {
                    selector: Some(selector),
                })
                .await
            {
                Ok(response) => {
                    let instances: Vec<_> = response
                        .into_inner()
                        .instances
                        .into_iter()
                        .map(|instance| {
                            json!({
                                "agent": instance.agent,
                                "instanceId": instance.instance_id,
                                "node": instance.node,
                                "address": instance.address,
                                "health": instance.health,
                                "identity": instance.identity,
                                "mcpTools": instance.mcp_tools,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(instances));
                    ExitCode::SUCCESS
                }
                Err(status) => refused(&status),
            }
        }
        Command::Deregister { id } => {
            match client
                .deregister(DeregisterRequest { instance_id: id })
                .await
            {
                Ok(_) => ExitCode::SUCCESS,
                Err(status) => refused(&status),
            }
        }
    }
}
