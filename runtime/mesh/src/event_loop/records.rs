//! Kademlia records and the node's request-response protocols.

use futures::FutureExt;
use libp2p::PeerId;
use libp2p::kad::{self, GetRecordError, GetRecordOk, QueryId, QueryResult};
use libp2p::request_response::{self, ResponseChannel};
use tokio::sync::oneshot;
use tracing::{debug, trace, warn};

use super::{Answer, EventLoop, clip};
use crate::MeshError;
use crate::error::show_key;
use crate::handle::{MeshEvent, ReplyHandle};
use crate::wire::{self, RpcRequest, RpcResponse};

impl EventLoop {
    pub(super) fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                if !self.is_admitted(&source) {
                    debug!(peer = %source, "record from a peer that is not admitted: dropped");
                } else if record.value.len() > self.cfg.max_message_size {
                    debug!(peer = %source, "oversized record dropped");
                } else if let Err(e) = kad::store::RecordStore::put(self.kad().store_mut(), record)
                {
                    debug!(peer = %source, "record not stored: {e}");
                }
            }
            kad::Event::OutboundQueryProgressed { id, result, .. } => self.on_query(id, result),
            _ => {}
        }
    }

    pub(super) fn on_query(&mut self, id: QueryId, result: QueryResult) {
        match result {
            QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                if let Some((_, tx)) = self.pending_get.remove(&id) {
                    let _ = tx.send(Ok(Some(found.record.value)));
                    if let Some(mut q) = self.kad().query_mut(&id) {
                        q.finish();
                    }
                }
            }
            QueryResult::GetRecord(Ok(GetRecordOk::FinishedWithNoAdditionalRecord { .. })) => {
                if let Some((_, tx)) = self.pending_get.remove(&id) {
                    let _ = tx.send(Ok(None));
                }
            }
            QueryResult::GetRecord(Err(e)) => {
                if let Some((key, tx)) = self.pending_get.remove(&id) {
                    let r = match e {
                        GetRecordError::NotFound { .. } => Ok(None),
                        other => Err(MeshError::Record {
                            key: show_key(&key),
                            reason: other.to_string(),
                        }),
                    };
                    let _ = tx.send(r);
                }
            }
            QueryResult::PutRecord(r) => {
                if let Some((key, tx)) = self.pending_put.remove(&id) {
                    if let Err(e) = r {
                        debug!(key = %show_key(&key), "record stored locally; replication incomplete: {e}");
                    }
                    let _ = tx.send(Ok(()));
                }
            }
            QueryResult::Bootstrap(r) => trace!(result = ?r, "kademlia bootstrap step"),
            _ => {}
        }
    }

    pub(super) fn on_rpc(&mut self, event: request_response::Event<RpcRequest, RpcResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_request(peer, request, channel),
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((peer, protocol, tx)) = self.pending_requests.remove(&request_id) else {
                    return;
                };
                let r = match response.error {
                    Some(reason) => Err(MeshError::Remote {
                        peer,
                        protocol,
                        reason: clip(reason),
                    }),
                    None if response.data.len() > self.cfg.max_message_size => {
                        Err(MeshError::Request {
                            peer,
                            protocol,
                            reason: format!(
                                "the answer is {} bytes, over the limit",
                                response.data.len()
                            ),
                        })
                    }
                    None => Ok(response.data),
                };
                let _ = tx.send(r);
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((peer, protocol, tx)) = self.pending_requests.remove(&request_id) {
                    let _ = tx.send(Err(MeshError::Request {
                        peer,
                        protocol,
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound request failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    pub(super) fn on_request(
        &mut self,
        peer: PeerId,
        request: RpcRequest,
        channel: ResponseChannel<RpcResponse>,
    ) {
        if !self.is_admitted(&peer) {
            // Dropping the channel fails the request on the other side.
            debug!(%peer, "request from a peer that is not admitted: dropped");
            return;
        }
        let refuse = if wire::check_versioned_name(&request.protocol).is_err() {
            let name: String = request.protocol.chars().take(wire::MAX_NAME_LEN).collect();
            Some(format!("{name:?} is not a versioned protocol name"))
        } else if request.data.len() > self.cfg.max_message_size {
            Some(format!(
                "the request is {} bytes, over the limit",
                request.data.len()
            ))
        } else {
            None
        };
        if let Some(reason) = refuse {
            let _ = self
                .swarm
                .behaviour_mut()
                .gated
                .inner_mut()
                .rpc
                .send_response(channel, RpcResponse::error(reason));
            return;
        }
        let (tx, rx) = oneshot::channel();
        let protocol = request.protocol;
        // If the event cannot be delivered, the dropped ReplyHandle answers with an error.
        self.emit(MeshEvent::Request {
            peer,
            protocol: protocol.clone(),
            data: request.data,
            reply: ReplyHandle { tx },
        });
        let timeout = self.cfg.request_timeout;
        self.answers.push(
            async move {
                let result = tokio::time::timeout(timeout, rx).await;
                Answer {
                    channel,
                    peer,
                    protocol,
                    result,
                }
            }
            .boxed(),
        );
    }

    pub(super) fn on_answer(&mut self, answer: Answer) {
        let Answer {
            channel,
            peer,
            protocol,
            result,
        } = answer;
        let response = match result {
            Ok(Ok(r)) if r.data.len() > self.cfg.max_message_size => {
                warn!(%peer, %protocol, size = r.data.len(), "answer exceeds the message size limit");
                RpcResponse::error(format!(
                    "{protocol}: the answer ({} bytes) exceeds the limit of {} bytes",
                    r.data.len(),
                    self.cfg.max_message_size
                ))
            }
            Ok(Ok(r)) => r,
            Ok(Err(_)) => RpcResponse::error(format!(
                "{protocol}: the node dropped the request unanswered"
            )),
            Err(_) => RpcResponse::error(format!(
                "{protocol}: no answer within {:?}",
                self.cfg.request_timeout
            )),
        };
        if self
            .swarm
            .behaviour_mut()
            .gated
            .inner_mut()
            .rpc
            .send_response(channel, response)
            .is_err()
        {
            debug!(%peer, %protocol, "the requester went away before the answer");
        }
    }
}
