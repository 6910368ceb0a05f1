"""Ask the gateway for recommendations over gRPC.

    python examples/recommend_client.py --target=localhost:8000 --domain=books --user=A1B2C3 --k=10

The same call with a generic command-line client, through server reflection:

    grpcurl -plaintext -d '{"user_id": "A1B2C3", "domain": "books", "k": 10, "exclude_seen": true}' \
        localhost:8000 recsys.v1.RecommendationService/Recommend
"""

from __future__ import annotations

import argparse
import sys

import grpc

from recsys.v1 import common_pb2, recommendation_pb2, recommendation_pb2_grpc  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description="Recommend k items for a user.")
    parser.add_argument("--target", default="localhost:8000", help="gateway host:port")
    parser.add_argument("--domain", required=True, help="target domain, e.g. books")
    parser.add_argument("--user", required=True, help="the user's id as the data has it")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1.0, help="deadline in seconds")
    parser.add_argument("--include-seen", action="store_true", help="keep items already seen")
    args = parser.parse_args()

    request = recommendation_pb2.RecommendRequest(
        user_id=args.user, domain=args.domain, k=args.k, exclude_seen=not args.include_seen
    )
    with grpc.insecure_channel(args.target) as channel:
        stub = recommendation_pb2_grpc.RecommendationServiceStub(channel)
        try:
            reply = stub.Recommend(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if reply.degraded:
        for d in reply.degradations:
            reason = recommendation_pb2.DegradationReason.Name(d.reason)
            print(f"degraded: {reason} ({d.detail})")
    for rank, item in enumerate(reply.items, 1):
        source = common_pb2.CandidateSource.Name(item.source)
        print(f"{rank:>3}  {item.score:8.3f}  {source:<28}  {item.item_id}  {item.title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
